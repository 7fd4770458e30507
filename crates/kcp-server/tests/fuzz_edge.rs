//! Fuzzing the edge on stable Rust with proptest: model extraction (JSON and multipart), path
//! normalization and config parsing. Arbitrary input never panics, and where a reference
//! exists the answer matches it: a full `serde_json` parse for the model and the completion
//! budget, an independent percent-decoder for paths.
//!
//! Fast by default; `KCP_FUZZ_CASES=1000000 cargo test -p kcp-server --release --test
//! fuzz_edge -- --nocapture` runs a long session and prints how long each property took
//! (config parsing runs a hundredth of that: each case writes a file).

// figment's `Jail` closures return `figment::Error`, which is large; not ours to shrink.
#![allow(clippy::result_large_err)]

use std::time::Instant;

use http::HeaderValue;
use kcp_server::cli::Cli;
use kcp_server::config;
use kcp_server::edge::path::normalize_path;
use kcp_server::proxy::model::{MAX_MODEL_BYTES, ModelName, inspect};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value};

/// Cases per property: `KCP_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KCP_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Runs `test` over `strategy` for `cases` cases, printing the time taken in a long run.
fn fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    if let Err(error) = runner.run(&strategy, test) {
        panic!("{name}: {error}");
    }
    if std::env::var_os("KCP_FUZZ_CASES").is_some() {
        eprintln!("{name}: {cases} cases in {:.1?}", started.elapsed());
    }
}

fn json_type() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// Arbitrary JSON values, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,300}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request object with any of the fields kcp reads, and others.
fn request_object() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just("model".to_owned()),
        Just("max_tokens".to_owned()),
        Just("max_completion_tokens".to_owned()),
        Just("messages".to_owned()),
        "[a-z_]{1,12}",
    ];
    proptest::collection::btree_map(field, json_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

#[test]
fn json_model_extraction_matches_a_full_parse() {
    fuzz("json model", cases(256), request_object(), |object| {
        let body = serde_json::to_vec(&object).expect("serializable");
        let head = inspect(Some(&json_type()), &body);
        let reference = &object["model"];
        prop_assert_eq!(head.model.as_deref(), reference.as_str());
        prop_assert!(head.json);
        let budget = object["max_tokens"]
            .as_u64()
            .or(object["max_completion_tokens"].as_u64());
        prop_assert_eq!(head.max_completion, budget);
        if let Some(model) = head.model.as_deref() {
            let named = ModelName::new(model);
            prop_assert_eq!(named.is_ok(), model.len() <= MAX_MODEL_BYTES);
        }
        Ok(())
    });
}

#[test]
fn arbitrary_bodies_never_panic_and_never_invent_a_model() {
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        request_object().prop_map(|o| {
            let mut bytes = serde_json::to_vec(&o).expect("serializable");
            bytes.truncate(bytes.len() / 2);
            bytes
        }),
    ];
    fuzz("arbitrary bodies", cases(256), body, |body| {
        let head = inspect(Some(&json_type()), &body);
        if let Some(model) = head.model.as_deref() {
            // Whatever the extractor reports, a full parse agrees on.
            let parsed: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("a model from invalid JSON: {e}")))?;
            prop_assert_eq!(parsed["model"].as_str(), Some(model));
        }
        let multipart = HeaderValue::from_static("multipart/form-data; boundary=xyz");
        let _ = inspect(Some(&multipart), &body);
        Ok(())
    });
}

/// A multipart body with the model in one of its parts.
fn multipart() -> impl Strategy<Value = (String, Vec<u8>, Option<String>)> {
    let part = ("[a-z_]{1,10}", "[ -~]{0,40}");
    (
        "[A-Za-z0-9'()+_,./:=?-]{1,40}",
        proptest::collection::vec(part, 0..4),
        proptest::option::of("[ -~]{0,300}"),
    )
        .prop_filter_map("boundary not inside a value", |(boundary, parts, model)| {
            let values = parts.iter().map(|(_, v)| v).chain(model.iter());
            if values
                .clone()
                .any(|v| v.contains(&boundary) || v.contains("--"))
            {
                return None;
            }
            let mut body = Vec::new();
            let mut named: Vec<(String, String)> = parts
                .into_iter()
                .filter(|(name, _)| name != "model")
                .collect();
            if let Some(model) = &model {
                named.insert(named.len() / 2, ("model".to_owned(), model.clone()));
            }
            for (name, value) in &named {
                body.extend_from_slice(
                    format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n\
                         {value}\r\n"
                    )
                    .as_bytes(),
                );
            }
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            Some((boundary, body, model))
        })
}

#[test]
fn multipart_model_extraction_finds_the_field() {
    fuzz(
        "multipart model",
        cases(256),
        multipart(),
        |(boundary, body, model)| {
            let content_type =
                HeaderValue::from_str(&format!("multipart/form-data; boundary=\"{boundary}\""))
                    .expect("header value");
            let head = inspect(Some(&content_type), &body);
            // The field's value, trimmed as form fields are.
            prop_assert_eq!(head.model.as_deref(), model.as_deref().map(str::trim));
            Ok(())
        },
    );
}

/// Reference percent-decoding of unreserved characters, for comparison.
fn decode_unreserved(path: &str) -> String {
    let mut out = String::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(hex, 16) {
                if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                    out.push(char::from(value));
                } else {
                    out.push('%');
                    out.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

#[test]
fn path_normalization_is_safe_and_idempotent() {
    let segment = prop_oneof![
        "[a-zA-Z0-9_:-]{1,8}",
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E%2e".to_owned()),
        Just("%5c".to_owned()),
        Just("%2F".to_owned()),
        Just("%66".to_owned()),
        Just(String::new()),
        "[!-~]{1,6}",
    ];
    let path = proptest::collection::vec(segment, 0..8).prop_map(|s| format!("/{}", s.join("/")));
    fuzz("path normalization", cases(1024), path, |path| {
        let Ok(normalized) = normalize_path(&path) else {
            return Ok(());
        };
        prop_assert!(normalized.starts_with('/'));
        prop_assert!(!normalized.contains('\\'));
        let segments: Vec<&str> = normalized[1..].split('/').collect();
        for (i, segment) in segments.iter().enumerate() {
            prop_assert!(*segment != "." && *segment != "..", "{normalized}");
            prop_assert!(
                !segment.is_empty() || i + 1 == segments.len(),
                "{normalized}"
            );
            prop_assert!(
                !segment.to_ascii_lowercase().contains("%5c"),
                "{normalized}"
            );
        }
        let again = normalize_path(&normalized);
        prop_assert_eq!(again.as_deref(), Ok(normalized.as_str()));
        prop_assert_eq!(decode_unreserved(&path), normalized);
        Ok(())
    });
}

#[test]
fn arbitrary_paths_never_panic() {
    fuzz("arbitrary paths", cases(1024), "/.{0,64}", |path| {
        let _ = normalize_path(&path);
        Ok(())
    });
}

/// Config text: lines built from real section and field names with arbitrary values, or noise.
fn config_text() -> impl Strategy<Value = String> {
    let section = proptest::sample::select(vec![
        "[server]",
        "[upstream]",
        "[keys]",
        "[rate_limit]",
        "[observability]",
        "[auth]",
        "[cors]",
        "[[api_keys]]",
        "[bogus]",
    ]);
    let field = proptest::sample::select(vec![
        "bind_addr",
        "max_inflight",
        "body_timeout_ms",
        "max_connections",
        "base_url",
        "max_retries",
        "rotation_strategy",
        "burst",
        "tracing_level",
        "client_keys",
        "allow_anonymous",
        "allowed_origins",
        "key",
        "url",
        "models",
        "weight",
        "unknown",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "\"[ -~]{0,30}\"",
        Just("\"0.0.0.0:8080\"".to_owned()),
        Just("[\"*\"]".to_owned()),
        "[ -~]{0,20}",
    ];
    let line = prop_oneof![
        section.prop_map(str::to_owned),
        (field, value).prop_map(|(f, v)| format!("{f} = {v}")),
        "[ -~]{0,30}",
    ];
    proptest::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

#[test]
fn config_parsing_never_panics() {
    // Each case writes a file: a hundredth of a long run's cases, at least 32.
    let n = (cases(3_200) / 100).max(32);
    fuzz("config parsing", n, config_text(), |text| {
        // A failing jail panics, which the runner reports with the input.
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("config.toml", &text)?;
            jail.set_env("OPENAI_KEYS", "sk-fuzz");
            // Any outcome is fine; a panic or an error without a problem line is not.
            if let Err(error) = config::load(&Cli::default()) {
                assert!(!error.to_string().is_empty());
            }
            Ok(())
        });
        Ok(())
    });
}
