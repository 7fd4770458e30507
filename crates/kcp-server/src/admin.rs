//! The admin API: look at the key pool and steer it while the proxy runs.
//!
//! Operators need to see why traffic avoids a key (cooling, disabled, circuit open, learned
//! limits spent), take a key out before revoking it, put it back, and reload the config
//! without a restart. The API is served on the metrics listener (loopback by default) and is
//! off unless `observability.admin_token` is set; every request must carry
//! `Authorization: Bearer <admin_token>` (or HTTP Basic with the token as the password, which
//! is what a browser on the status page sends), compared in constant time. Authentication
//! comes before routing, so without the token nothing about routes or key names is revealed.
//!
//! Routes (everything else under `/admin` is 404):
//! - `GET /admin/keys`: `{"keys":[…]}`, one [`kcp_core::KeySnapshot`] per key (name,
//!   fingerprint, url, models, status and reason, cooldown, in-flight, outcomes, latency,
//!   learned limits); snapshots never contain a secret.
//! - `POST /admin/keys/{name}/disable`, `POST /admin/keys/{name}/enable`: the key's new
//!   snapshot, or 404 for an unknown name. `{name}` may be percent-encoded.
//! - `POST /admin/keys/{name}/recheck`: the re-check of a key the provider rejected is due
//!   now (the re-check task sends it within a second); its snapshot, or 409 when the key is
//!   not disabled by the provider (nothing to re-check).
//! - `POST /admin/reload`: `{"reloaded":true,"keys":N}`, or 400 with the config error
//!   (which never contains secrets) while the running config stays in effect.
//!
//! The handler reaches the running proxy only through [`AdminOps`], so it is tested without
//! a server and the service decides how a reload swaps its state.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use kcp_core::{Changes, KeyPool, Secret};
use serde::Serialize;

use base64::Engine;

use crate::clock;
use crate::edge::auth::{bearer_token, matches_any};
use crate::edge::openai_error::OpenAiError;

/// What the admin API needs from the running proxy.
pub trait AdminOps: Send + Sync {
    /// The key pool in service now.
    fn pool(&self) -> Arc<KeyPool>;

    /// Reloads the configuration and swaps it in: the number of keys now in the pool, or
    /// the error text (which must not contain secrets) while the old config stays.
    fn reload(&self) -> Result<usize, String>;

    /// Called after an operator disabled or enabled `key`, with the state changes that
    /// caused (for logs and metrics, and for the other replicas with `[cluster]`: an
    /// operator's decision is the whole cluster's). Does nothing by default.
    fn key_changed(&self, key: &str, changes: Changes) {
        let _ = (key, changes);
    }
}

/// The admin API's gate and router.
#[derive(Debug, Clone)]
pub struct Admin {
    token: Option<Secret>,
}

/// A parsed admin route.
#[derive(Debug, PartialEq)]
enum Route {
    Keys,
    SetDisabled { name: String, disable: bool },
    Recheck { name: String },
    Reload,
    Unknown,
}

impl Admin {
    /// The admin API guarded by `token`; off when there is none (or it is empty).
    pub fn new(token: Option<Secret>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// Whether the admin API is on.
    pub fn is_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `path` belongs to the admin API (`/admin` or below).
    pub fn is_admin_path(path: &str) -> bool {
        path == "/admin" || path.starts_with("/admin/")
    }

    /// Answers one admin request. The request body is not read.
    pub async fn handle<B: From<Full<Bytes>>>(
        &self,
        request: Request<impl http_body::Body>,
        ops: &dyn AdminOps,
    ) -> Response<B> {
        let parts = request.into_parts().0;
        if self.token.is_none() {
            return admin_off().into_response();
        }
        let path = parts.uri.path();
        if !Self::is_admin_path(path) {
            return unknown_route(&parts.method, path).into_response();
        }
        if !self.authorized(&parts.headers) {
            tracing::warn!(method = %parts.method, "admin: request without a valid token");
            return unauthorized().into_response();
        }
        match route(&parts.method, path) {
            Route::Keys => {
                let keys = ops.pool().snapshot(clock::now());
                json(StatusCode::OK, &serde_json::json!({ "keys": keys }))
            }
            Route::SetDisabled { name, disable } => set_disabled(ops, &name, disable),
            Route::Recheck { name } => recheck(ops, &name),
            Route::Reload => reload(ops),
            Route::Unknown => unknown_route(&parts.method, path).into_response(),
        }
    }
}

impl Admin {
    /// Whether `headers` carry the admin token: `Authorization: Bearer <token>`, or HTTP
    /// Basic with any user and the token as the password. False when the API is off.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let keys = std::slice::from_ref(token);
        let mut found = subtle::Choice::from(0);
        for value in headers.get_all(header::AUTHORIZATION) {
            if let Some(presented) = bearer_token(value) {
                found |= matches_any(keys, presented);
            } else if let Some(password) = basic_password(value) {
                found |= matches_any(keys, &password);
            }
        }
        bool::from(found)
    }
}

/// The password of an `Authorization: Basic base64(user:password)` value (RFC 7617).
fn basic_password(value: &HeaderValue) -> Option<Vec<u8>> {
    let value = value.as_bytes().trim_ascii();
    let split = value.iter().position(|b| *b == b' ')?;
    let (scheme, credentials) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

fn route(method: &Method, path: &str) -> Route {
    match (method, path) {
        (&Method::GET, "/admin/keys") => Route::Keys,
        (&Method::POST, "/admin/reload") => Route::Reload,
        (&Method::POST, _) => path
            .strip_prefix("/admin/keys/")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(name, action)| {
                let name = percent_decode(name).filter(|n| !n.is_empty())?;
                match action {
                    "disable" => Some(Route::SetDisabled {
                        name,
                        disable: true,
                    }),
                    "enable" => Some(Route::SetDisabled {
                        name,
                        disable: false,
                    }),
                    "recheck" => Some(Route::Recheck { name }),
                    _ => None,
                }
            })
            .unwrap_or(Route::Unknown),
        _ => Route::Unknown,
    }
}

fn set_disabled<B: From<Full<Bytes>>>(
    ops: &dyn AdminOps,
    name: &str,
    disable: bool,
) -> Response<B> {
    let pool = ops.pool();
    let now = clock::now();
    let action = if disable { "disable" } else { "enable" };
    let Some(changes) = pool.set_disabled(name, disable, now) else {
        tracing::info!(key = ?shorten(name), action, "admin: no such key");
        return key_not_found(name).into_response();
    };
    tracing::info!(key = %name, action, "admin: key {action}d by operator");
    ops.key_changed(name, changes);
    match pool.snapshot(now).into_iter().find(|k| k.name == name) {
        Some(snapshot) => json(StatusCode::OK, &snapshot),
        None => key_not_found(name).into_response(),
    }
}

fn recheck<B: From<Full<Bytes>>>(ops: &dyn AdminOps, name: &str) -> Response<B> {
    let pool = ops.pool();
    let now = clock::now();
    match pool.recheck_now(name, now) {
        None => key_not_found(name).into_response(),
        Some(false) => nothing_to_recheck(name).into_response(),
        Some(true) => {
            tracing::info!(key = %name, "admin: re-check requested by operator");
            match pool.snapshot(now).into_iter().find(|k| k.name == name) {
                Some(snapshot) => json(StatusCode::OK, &snapshot),
                None => key_not_found(name).into_response(),
            }
        }
    }
}

fn reload<B: From<Full<Bytes>>>(ops: &dyn AdminOps) -> Response<B> {
    match ops.reload() {
        Ok(keys) => {
            tracing::info!(keys, "admin: configuration reloaded");
            json(
                StatusCode::OK,
                &serde_json::json!({ "reloaded": true, "keys": keys }),
            )
        }
        Err(error) => {
            tracing::warn!(%error, "admin: reload failed; the running configuration stays");
            reload_failed(&error).into_response()
        }
    }
}

fn json<B: From<Full<Bytes>>>(status: StatusCode, value: &impl Serialize) -> Response<B> {
    let body = match serde_json::to_vec(value) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "admin: response did not serialize");
            return OpenAiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "The admin response could not be encoded.",
            )
            .into_response();
        }
    };
    let mut response = Response::new(B::from(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let high = hex(*bytes.get(i + 1)?)?;
            let low = hex(*bytes.get(i + 2)?)?;
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// At most 128 characters of user input, for messages and logs.
fn shorten(text: &str) -> String {
    text.chars().take(128).collect()
}

fn admin_off() -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        "The admin API is off: set observability.admin_token to turn it on.",
    )
}

fn unauthorized() -> OpenAiError {
    OpenAiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_admin_token",
        "Missing or invalid admin token: send `Authorization: Bearer <observability.admin_token>`.",
    )
}

fn unknown_route(method: &Method, path: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!(
            "Unknown admin route `{method} {}`: the admin API serves GET /admin/keys, \
             POST /admin/keys/{{name}}/disable, POST /admin/keys/{{name}}/enable, \
             POST /admin/keys/{{name}}/recheck and POST /admin/reload.",
            shorten(path)
        ),
    )
}

fn key_not_found(name: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "key_not_found",
        format!(
            "No key named `{}` in the pool: GET /admin/keys lists the names.",
            shorten(name)
        ),
    )
}

fn nothing_to_recheck(name: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        "nothing_to_recheck",
        format!(
            "Key `{}` is not disabled by the provider, so there is nothing to re-check: \
             POST /admin/keys/{{name}}/enable puts back a key an operator disabled.",
            shorten(name)
        ),
    )
}

fn reload_failed(error: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "reload_failed",
        format!("The configuration was not reloaded; the running one stays in effect: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Empty};
    use kcp_core::{KeySpec, PoolConfig, StateChange};
    use serde_json::Value;

    use super::*;

    const TOKEN: &str = "admin-token-3b9e1c0d5a7f";
    const SECRETS: [&str; 2] = ["sk-test-alpha-0123456789", "sk-test-beta-9876543210"];

    struct FakeOps {
        pool: Arc<KeyPool>,
        reload: Result<usize, String>,
        changed: Mutex<Vec<(String, Vec<StateChange>)>>,
    }

    impl FakeOps {
        fn new(reload: Result<usize, String>) -> Self {
            let specs = vec![
                KeySpec::new(Secret::new(SECRETS[0]), "https://api.openai.com/v1")
                    .with_name("alpha")
                    .with_models(["gpt-4o*"]),
                KeySpec::new(Secret::new(SECRETS[1]), "https://api.openai.com/v1"),
            ];
            let pool = KeyPool::new(specs, PoolConfig::default()).expect("pool");
            Self {
                pool: Arc::new(pool),
                reload,
                changed: Mutex::new(Vec::new()),
            }
        }
    }

    impl AdminOps for FakeOps {
        fn pool(&self) -> Arc<KeyPool> {
            Arc::clone(&self.pool)
        }

        fn reload(&self) -> Result<usize, String> {
            self.reload.clone()
        }

        fn key_changed(&self, key: &str, changes: Changes) {
            if let Ok(mut changed) = self.changed.lock() {
                changed.push((key.to_owned(), changes.iter().collect()));
            }
        }
    }

    fn admin() -> Admin {
        Admin::new(Some(Secret::new(TOKEN)))
    }

    fn request(method: Method, path: &str, token: Option<&str>) -> Request<Empty<Bytes>> {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        builder.body(Empty::new()).expect("request")
    }

    async fn call(
        admin: &Admin,
        ops: &FakeOps,
        request: Request<Empty<Bytes>>,
    ) -> (StatusCode, String) {
        let response: Response<Full<Bytes>> = admin.handle(request, ops).await;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    async fn authed(ops: &FakeOps, method: Method, path: &str) -> (StatusCode, Value) {
        let (status, body) = call(&admin(), ops, request(method, path, Some(TOKEN))).await;
        (status, serde_json::from_str(&body).expect("json"))
    }

    #[tokio::test]
    async fn off_without_a_token() {
        for token in [None, Some(Secret::new("  "))] {
            let admin = Admin::new(token);
            assert!(!admin.is_enabled());
            let ops = FakeOps::new(Ok(2));
            let (status, body) =
                call(&admin, &ops, request(Method::GET, "/admin/keys", Some(""))).await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(!body.contains("alpha"));
        }
        assert!(admin().is_enabled());
    }

    #[tokio::test]
    async fn a_wrong_or_missing_token_is_401() {
        let ops = FakeOps::new(Ok(2));
        let wrong = format!("{TOKEN}x");
        for token in [None, Some("wrong"), Some(&TOKEN[1..]), Some(wrong.as_str())] {
            for (method, path) in [
                (Method::GET, "/admin/keys"),
                (Method::POST, "/admin/keys/alpha/disable"),
                (Method::POST, "/admin/reload"),
                (Method::GET, "/admin/nothing"),
            ] {
                let (status, body) = call(&admin(), &ops, request(method, path, token)).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
                let value: Value = serde_json::from_str(&body).expect("json");
                assert_eq!(value["error"]["code"], "invalid_admin_token");
                assert!(!body.contains(TOKEN));
            }
        }
        let basic = Request::get("/admin/keys")
            .header(header::AUTHORIZATION, format!("Basic {TOKEN}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        assert_eq!(
            call(&admin(), &ops, basic).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert!(
            ops.pool
                .snapshot(clock::now())
                .iter()
                .all(|k| k.status == kcp_core::KeyStatus::Available)
        );
    }

    #[tokio::test]
    async fn lists_keys_without_secrets() {
        let ops = FakeOps::new(Ok(2));
        let (status, body) = call(
            &admin(),
            &ops,
            request(Method::GET, "/admin/keys", Some(TOKEN)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        for secret in SECRETS {
            assert!(!body.contains(secret), "secret in {body}");
            assert!(body.contains(&Secret::new(secret).fingerprint()));
        }
        let value: Value = serde_json::from_str(&body).expect("json");
        let keys = value["keys"].as_array().expect("keys array");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["name"], "alpha");
        assert_eq!(keys[0]["models"][0], "gpt-4o*");
        assert_eq!(keys[0]["status"], "available");
        assert_eq!(keys[1]["name"], Secret::new(SECRETS[1]).fingerprint());
    }

    #[tokio::test]
    async fn disable_and_enable_round_trip() {
        let ops = FakeOps::new(Ok(2));
        let (status, key) = authed(&ops, Method::POST, "/admin/keys/alpha/disable").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(key["name"], "alpha");
        assert_eq!(key["status"], "disabled");
        let (_, listing) = authed(&ops, Method::GET, "/admin/keys").await;
        assert_eq!(listing["keys"][0]["status"], "disabled");
        assert_eq!(listing["keys"][1]["status"], "available");

        let (status, key) = authed(&ops, Method::POST, "/admin/keys/alpha/enable").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(key["status"], "available");
        let changed = ops.changed.lock().expect("lock").clone();
        assert_eq!(changed.len(), 2);
        assert_eq!(changed[0].0, "alpha");
        assert!(matches!(changed[0].1[..], [StateChange::Disabled { .. }]));
        assert_eq!(changed[1].1, [StateChange::Enabled]);
    }

    #[tokio::test]
    async fn names_may_be_percent_encoded() {
        let ops = FakeOps::new(Ok(2));
        let (status, key) = authed(&ops, Method::POST, "/admin/keys/%61lpha/disable").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(key["status"], "disabled");
    }

    #[tokio::test]
    async fn an_unknown_key_is_404() {
        let ops = FakeOps::new(Ok(2));
        for path in [
            "/admin/keys/gamma/disable",
            "/admin/keys/gamma/enable",
            "/admin/keys/%zz/enable",
        ] {
            let (status, value) = authed(&ops, Method::POST, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(value["error"]["message"].is_string());
        }
        let (_, value) = authed(&ops, Method::POST, "/admin/keys/gamma/disable").await;
        assert_eq!(value["error"]["code"], "key_not_found");
        assert!(ops.changed.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn other_routes_are_404() {
        let ops = FakeOps::new(Ok(2));
        for (method, path) in [
            (Method::POST, "/admin/keys"),
            (Method::GET, "/admin/reload"),
            (Method::GET, "/admin/keys/alpha/disable"),
            (Method::POST, "/admin/keys/alpha/pause"),
            (Method::POST, "/admin/keys//disable"),
            (Method::POST, "/admin/keys/alpha"),
            (Method::DELETE, "/admin/keys/alpha"),
            (Method::GET, "/admin"),
            (Method::GET, "/metrics"),
        ] {
            let (status, value) = authed(&ops, method.clone(), path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(value["error"]["code"], "unknown_url");
        }
        assert!(Admin::is_admin_path("/admin/keys"));
        assert!(!Admin::is_admin_path("/administrator"));
    }

    #[tokio::test]
    async fn reload_reports_success() {
        let ops = FakeOps::new(Ok(5));
        let (status, value) = authed(&ops, Method::POST, "/admin/reload").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(value, serde_json::json!({ "reloaded": true, "keys": 5 }));
    }

    #[tokio::test]
    async fn reload_reports_failure() {
        let ops = FakeOps::new(Err(
            "config.toml: [server] max_inflight must be at least 1".to_owned()
        ));
        let (status, value) = authed(&ops, Method::POST, "/admin/reload").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(value["error"]["code"], "reload_failed");
        let message = value["error"]["message"].as_str().expect("message");
        assert!(
            message.contains("max_inflight must be at least 1"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn basic_auth_with_the_token_as_password_is_accepted() {
        let ops = FakeOps::new(Ok(2));
        let basic = |credentials: &str| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            Request::get("/admin/keys")
                .header(header::AUTHORIZATION, format!("Basic {encoded}"))
                .body(Empty::<Bytes>::new())
                .expect("request")
        };
        for user in ["", "admin", "anyone"] {
            let (status, _) = call(&admin(), &ops, basic(&format!("{user}:{TOKEN}"))).await;
            assert_eq!(status, StatusCode::OK, "user {user:?}");
        }
        for wrong in [TOKEN.to_owned(), format!("{TOKEN}:"), format!("x:{TOKEN}x")] {
            let (status, _) = call(&admin(), &ops, basic(&wrong)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
    }

    #[tokio::test]
    async fn recheck_needs_a_key_the_provider_disabled() {
        let ops = FakeOps::new(Ok(2));
        let (status, body) = authed(&ops, Method::POST, "/admin/keys/alpha/recheck").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["error"]["code"], "nothing_to_recheck");
        authed(&ops, Method::POST, "/admin/keys/alpha/disable").await;
        let (status, body) = authed(&ops, Method::POST, "/admin/keys/alpha/recheck").await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "a manual disable is not re-checked"
        );
        assert_eq!(body["error"]["code"], "nothing_to_recheck");
        let (status, body) = authed(&ops, Method::POST, "/admin/keys/nobody/recheck").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "key_not_found");
    }

    #[test]
    fn debug_hides_the_token() {
        assert!(!format!("{:?}", admin()).contains(TOKEN));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Some("€"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%+f"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
