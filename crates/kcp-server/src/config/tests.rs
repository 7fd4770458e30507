//! `load` end to end: layers, key merging, validation messages and redaction.
//!
//! Every test runs in a `figment::Jail`, which serializes environment changes and gives each
//! test a fresh working directory for `config.toml` / `config.json`.
#![allow(
    clippy::result_large_err,
    reason = "figment::Jail closures must return figment::Result, whose error is large"
)]

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::Jail;
use kcp_core::{KeyKind, KeySpec, Strategy};

use super::*;
use crate::cli::Cli;

const SEED_JSON: &str = r#"{
  "apiKeys": [
    {
      "key": "sk-your-openai-key-1",
      "url": "https://api.openai.com/v1",
      "models": ["gpt-3.5-turbo", "gpt-3.5-turbo-16k"]
    },
    {
      "key": "sk-your-openai-key-2", 
      "url": "https://api.openai.com/v1",
      "models": ["gpt-4", "gpt-4-32k"]
    },
    {
      "key": "sk-your-proxy-key",
      "url": "https://your-proxy.com/v1",
      "models": ["others"]
    }
  ]
}"#;

/// Runs `test` in a jail without inherited `KCP_*` / `OPENAI_KEYS` variables.
fn jail(test: impl FnOnce(&mut Jail) -> figment::Result<()>) {
    Jail::expect_with(|jail| {
        let inherited = std::env::vars_os().any(|(name, _)| {
            let name = name.to_string_lossy().to_ascii_uppercase();
            name.starts_with("KCP_") || name == "OPENAI_KEYS"
        });
        if inherited {
            jail.clear_env();
        }
        test(jail)
    });
}

fn loaded(cli: &Cli) -> figment::Result<LoadedConfig> {
    load(cli).map_err(|error| error.to_string().into())
}

/// The problem lines of a load that must fail.
fn problems(cli: &Cli) -> Vec<String> {
    match load(cli) {
        Ok(config) => panic!("expected a config error, got {config:?}"),
        Err(error) => error.problems().iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that one problem line contains every needle.
fn assert_problem(problems: &[String], needles: &[&str]) {
    assert!(
        problems
            .iter()
            .any(|line| needles.iter().all(|needle| line.contains(needle))),
        "no problem contains all of {needles:?}; problems:\n{}",
        problems.join("\n")
    );
}

/// Loads `toml` (plus `OPENAI_KEYS=sk-env` so keys are never missing) and returns the problems.
fn toml_problems(jail: &mut Jail, toml: &str) -> figment::Result<Vec<String>> {
    jail.create_file("config.toml", toml)?;
    jail.set_env("OPENAI_KEYS", "sk-env");
    Ok(problems(&Cli::default()))
}

fn exposed(keys: &[KeySpec]) -> Vec<&str> {
    keys.iter().map(|key| key.secret.expose()).collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[test]
fn defaults_with_only_openai_keys() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", "sk-only");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(loaded.config, Config::default());
        let server = &loaded.config.server;
        assert_eq!(server.bind_addr, addr("127.0.0.1:8080"));
        assert_eq!(server.request_body_limit_bytes, 32 * 1024 * 1024);
        assert_eq!(server.graceful_shutdown_seconds, 10);
        assert_eq!(server.max_inflight, 10_000);
        assert_eq!(server.header_read_timeout_ms, 10_000);
        assert_eq!(server.body_read_timeout_ms, 30_000);
        assert_eq!(server.max_header_bytes, 65_536);
        assert_eq!(server.worker_threads, 0);
        let upstream = &loaded.config.upstream;
        assert_eq!(upstream.base_url, "https://api.openai.com/v1");
        assert_eq!(upstream.connect_timeout_ms, 3_000);
        assert_eq!(upstream.request_timeout_ms, 600_000);
        assert_eq!(upstream.retry_initial_backoff_ms, 50);
        assert_eq!(upstream.retry_max_backoff_ms, 2_000);
        assert_eq!(upstream.max_retries, 3);
        assert_eq!(upstream.stream_idle_timeout_ms, 60_000);
        assert_eq!(upstream.ca_file, None);
        assert_eq!(
            loaded.config.keys.rotation_strategy,
            Strategy::RoundRobinHealthWeighted
        );
        assert_eq!(loaded.config.keys.unhealthy_penalty, 5);
        let rate = &loaded.config.rate_limit;
        assert_eq!((rate.per_key_rps, rate.global_rps), (None, None));
        assert_eq!(rate.burst, 10);
        assert_eq!(rate.max_wait_ms, 5_000);
        assert_eq!(rate.max_queue, 1_024);
        assert_eq!(rate.default_completion_tokens, 256);
        let observability = &loaded.config.observability;
        assert_eq!(observability.metrics_bind, addr("127.0.0.1:9090"));
        assert_eq!(observability.tracing_level, "info");
        assert_eq!(observability.log_format, LogFormat::Text);
        assert_eq!(observability.admin_token, None);
        assert!(loaded.config.cors.allowed_origins.is_empty());
        assert!(loaded.client_keys.is_empty());

        assert_eq!(exposed(&loaded.keys), ["sk-only"]);
        let key = &loaded.keys[0];
        assert_eq!(key.url, "https://api.openai.com/v1");
        assert_eq!(key.models, ["others"]);
        assert_eq!((key.weight, key.name.as_deref()), (1, None));
        assert_eq!(
            loaded.sources,
            KeySources {
                env: 1,
                ..KeySources::default()
            }
        );
        Ok(())
    });
}

#[test]
fn toml_alone() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            r#"
            [server]
            bind_addr = "127.0.0.1:7000"
            max_inflight = 50

            [upstream]
            base_url = "https://example.test/v1"
            request_timeout_ms = 120000

            [keys]
            rotation_strategy = "least_latency"

            [rate_limit]
            per_key_rps = 2.5
            global_rps = 40

            [observability]
            log_format = "json"
            admin_token = "admin-secret"

            [auth]
            client_keys = ["client-1", "client-2"]

            [cors]
            allowed_origins = ["https://app.example.com"]

            [[api_keys]]
            key = "sk-toml-1"
            name = "primary"
            models = ["gpt-4o"]
            weight = 3
            rpm = 500
            tpm = 90000
            organization = "org-1"
            project = "proj-1"

            [[api_keys]]
            key = "sk-toml-2"
            url = "https://other.test/v1/"
            "#,
        )?;
        let loaded = loaded(&Cli::default())?;
        let config = &loaded.config;
        assert_eq!(config.server.bind_addr, addr("127.0.0.1:7000"));
        assert_eq!(config.server.max_inflight, 50);
        assert_eq!(
            config.server.max_header_bytes, 65_536,
            "untouched field keeps its default"
        );
        assert_eq!(config.upstream.request_timeout().as_secs(), 120);
        assert_eq!(config.keys.rotation_strategy, Strategy::LeastLatency);
        assert_eq!(config.rate_limit.per_key_rps, Some(2.5));
        assert_eq!(config.rate_limit.global_rps, Some(40.0));
        assert_eq!(config.observability.log_format, LogFormat::Json);
        assert_eq!(
            config
                .observability
                .admin_token
                .as_ref()
                .map(|t| t.expose()),
            Some("admin-secret")
        );
        assert_eq!(
            exposed_secrets(&loaded.client_keys),
            ["client-1", "client-2"]
        );
        assert_eq!(config.cors.allowed_origins, ["https://app.example.com"]);

        assert_eq!(exposed(&loaded.keys), ["sk-toml-1", "sk-toml-2"]);
        let first = &loaded.keys[0];
        assert_eq!(first.url, "https://example.test/v1", "defaults to base_url");
        assert_eq!(first.models, ["gpt-4o"]);
        assert_eq!(first.name.as_deref(), Some("primary"));
        assert_eq!(
            (first.weight, first.rpm, first.tpm),
            (3, Some(500), Some(90_000))
        );
        assert_eq!(first.organization.as_deref(), Some("org-1"));
        assert_eq!(first.project.as_deref(), Some("proj-1"));
        let second = &loaded.keys[1];
        assert_eq!(
            second.url, "https://other.test/v1",
            "trailing slash dropped"
        );
        assert_eq!(
            (second.models.as_slice(), second.weight),
            (&["others".to_owned()][..], 1)
        );
        assert_eq!(
            loaded.sources.to_string(),
            "2 keys: 2 from config.toml, 0 from config.json, 0 from OPENAI_KEYS"
        );
        Ok(())
    });
}

fn exposed_secrets(secrets: &[kcp_core::Secret]) -> Vec<&str> {
    secrets.iter().map(kcp_core::Secret::expose).collect()
}

#[test]
fn legacy_config_json_exactly_as_the_seed_shows() {
    jail(|jail| {
        jail.create_file("config.json", SEED_JSON)?;
        let loaded = loaded(&Cli::default())?;
        assert_eq!(
            exposed(&loaded.keys),
            [
                "sk-your-openai-key-1",
                "sk-your-openai-key-2",
                "sk-your-proxy-key"
            ]
        );
        assert_eq!(
            loaded.keys[0].models,
            ["gpt-3.5-turbo", "gpt-3.5-turbo-16k"]
        );
        assert_eq!(loaded.keys[1].models, ["gpt-4", "gpt-4-32k"]);
        assert_eq!(loaded.keys[2].models, ["others"]);
        assert_eq!(loaded.keys[2].url, "https://your-proxy.com/v1");
        assert!(
            loaded
                .keys
                .iter()
                .all(|key| key.weight == 1 && key.name.is_none())
        );
        assert_eq!(loaded.sources.json, 3);
        assert_eq!(loaded.config, Config::default());
        Ok(())
    });
}

#[test]
fn keys_file_flag_names_the_legacy_file() {
    jail(|jail| {
        jail.create_dir("etc")?;
        jail.create_file("etc/keys.json", r#"{"apiKeys": [{"key": "sk-flag"}]}"#)?;
        let cli = Cli {
            keys_file: Some(PathBuf::from("etc/keys.json")),
            ..Cli::default()
        };
        let loaded = loaded(&cli)?;
        assert_eq!(exposed(&loaded.keys), ["sk-flag"]);
        assert_eq!(loaded.keys[0].url, "https://api.openai.com/v1");
        assert_eq!(loaded.keys[0].models, ["others"]);
        Ok(())
    });
}

#[test]
fn environment_alone() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", "sk-env-1,sk-env-2");
        jail.set_env("KCP_SERVER__BIND_ADDR", "127.0.0.1:7100");
        jail.set_env("KCP_UPSTREAM__MAX_RETRIES", "7");
        jail.set_env("KCP_UPSTREAM__BASE_URL", "http://localhost:4000/v1");
        jail.set_env("KCP_KEYS__ROTATION_STRATEGY", "round_robin");
        jail.set_env("KCP_CORS__ALLOWED_ORIGINS", "[\"https://a.example\"]");
        jail.set_env("KCP_OBSERVABILITY__ADMIN_TOKEN", "0123");
        jail.set_env("KCP_AUTH__CLIENT_KEYS", "c1,,c2");
        let loaded = loaded(&Cli::default())?;
        let config = &loaded.config;
        assert_eq!(config.server.bind_addr, addr("127.0.0.1:7100"));
        assert_eq!(config.upstream.max_retries, 7);
        assert_eq!(config.keys.rotation_strategy, Strategy::RoundRobin);
        assert_eq!(config.cors.allowed_origins, ["https://a.example"]);
        assert_eq!(
            config
                .observability
                .admin_token
                .as_ref()
                .map(|t| t.expose()),
            Some("0123"),
            "secrets from the environment are taken verbatim, not as numbers"
        );
        assert_eq!(exposed_secrets(&loaded.client_keys), ["c1", "c2"]);
        assert_eq!(exposed(&loaded.keys), ["sk-env-1", "sk-env-2"]);
        assert!(
            loaded
                .keys
                .iter()
                .all(|key| key.url == "http://localhost:4000/v1" && key.models == ["others"])
        );
        Ok(())
    });
}

#[test]
fn environment_values_that_look_structured_stay_strings() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", "sk-a");
        jail.set_env("KCP_OBSERVABILITY__TRACING_LEVEL", "kcp_server=debug,info");
        jail.set_env("KCP_UPSTREAM__CA_FILE", "ca.pem");
        jail.create_file("ca.pem", "")?;
        let loaded = loaded(&Cli::default())?;
        assert_eq!(
            loaded.config.observability.tracing_level,
            "kcp_server=debug,info"
        );
        assert_eq!(
            loaded.config.upstream.ca_file,
            Some(PathBuf::from("ca.pem"))
        );
        Ok(())
    });
}

#[test]
fn openai_keys_skips_empty_entries() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", ",k1,,k2,");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(exposed(&loaded.keys), ["k1", "k2"]);
        assert_eq!(loaded.sources.env, 2);
        Ok(())
    });
}

#[test]
fn scalar_precedence_defaults_toml_env_cli() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", "sk-a");
        let bind = |cli: &Cli| loaded(cli).map(|l| l.config.server.bind_addr);
        assert_eq!(bind(&Cli::default())?, addr("127.0.0.1:8080"));

        jail.create_file("config.toml", "[server]\nbind_addr = \"127.0.0.1:1001\"\n")?;
        assert_eq!(bind(&Cli::default())?, addr("127.0.0.1:1001"));

        jail.set_env("KCP_SERVER__BIND_ADDR", "127.0.0.1:1002");
        assert_eq!(bind(&Cli::default())?, addr("127.0.0.1:1002"));

        let cli = Cli {
            bind: Some(addr("127.0.0.1:1003")),
            metrics_bind: Some(addr("127.0.0.1:1004")),
            ..Cli::default()
        };
        let loaded = loaded(&cli)?;
        assert_eq!(loaded.config.server.bind_addr, addr("127.0.0.1:1003"));
        assert_eq!(
            loaded.config.observability.metrics_bind,
            addr("127.0.0.1:1004")
        );
        Ok(())
    });
}

#[test]
fn keys_from_all_sources_are_combined_in_order() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            "[[api_keys]]\nkey = \"sk-toml\"\nname = \"from-toml\"\n",
        )?;
        jail.create_file("config.json", r#"{"apiKeys": [{"key": "sk-json", "url": "https://json.test/v1", "models": ["gpt-4"]}]}"#)?;
        jail.set_env("OPENAI_KEYS", "sk-env");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(exposed(&loaded.keys), ["sk-toml", "sk-json", "sk-env"]);
        assert_eq!(
            loaded.sources,
            KeySources {
                toml: 1,
                json: 1,
                env: 1,
                duplicates: 0
            }
        );
        assert_eq!(
            loaded.sources.to_string(),
            "3 keys: 1 from config.toml, 1 from config.json, 1 from OPENAI_KEYS"
        );
        Ok(())
    });
}

#[test]
fn duplicates_across_sources_keep_the_first() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            r#"
            [[api_keys]]
            key = "sk-shared"
            name = "named"
            weight = 4

            [[api_keys]]
            key = "sk-shared"
            url = "https://elsewhere.test/v1"
            "#,
        )?;
        jail.create_file(
            "config.json",
            r#"{"apiKeys": [{"key": "sk-shared", "url": "https://api.openai.com/", "models": ["others"]}]}"#,
        )?;
        // `https://api.openai.com/` and the default `.../v1` are one upstream (kcp-core's rule).
        jail.set_env("OPENAI_KEYS", "sk-shared,sk-new,sk-new");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(exposed(&loaded.keys), ["sk-shared", "sk-shared", "sk-new"]);
        assert_eq!(loaded.keys[0].name.as_deref(), Some("named"));
        assert_eq!(loaded.keys[0].weight, 4);
        assert_eq!(
            loaded.keys[1].url, "https://elsewhere.test/v1",
            "same secret, other url: a different key"
        );
        assert_eq!(
            loaded.sources.to_string(),
            "3 keys: 2 from config.toml, 0 from config.json, 1 from OPENAI_KEYS (3 duplicates removed)"
        );
        Ok(())
    });
}

#[test]
fn key_env_reads_the_named_variable() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            "[[api_keys]]\nkey_env = \"TEAM_KEY\"\nname = \"team\"\n",
        )?;
        jail.set_env("TEAM_KEY", " sk-from-env\n");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(exposed(&loaded.keys), ["sk-from-env"]);
        assert_eq!(loaded.sources.toml, 1);
        Ok(())
    });
}

#[test]
fn client_keys_env_adds_tokens() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            "[auth]\nclient_keys = [\"c1\"]\nclient_keys_env = \"MORE_TOKENS\"\n",
        )?;
        jail.set_env("OPENAI_KEYS", "sk-a");
        jail.set_env("MORE_TOKENS", "c2,,c1,c3");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(exposed_secrets(&loaded.client_keys), ["c1", "c2", "c3"]);
        Ok(())
    });
}

#[test]
fn unknown_field_in_toml_names_field_and_file() {
    jail(|jail| {
        let problems = toml_problems(jail, "[server]\nbind_adr = \"127.0.0.1:1\"\n")?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "unknown field `bind_adr` in [server]",
                "expected one of bind_addr",
                "rename it to `bind_addr`",
            ],
        );
        Ok(())
    });
}

#[test]
fn unknown_fields_elsewhere_name_their_source() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            "[sever]\nx = 1\n\n[[api_keys]]\nkey = \"sk-a\"\nwieght = 2\n",
        )?;
        jail.create_file(
            "config.json",
            r#"{"apiKeys": [{"key": "sk-b", "modles": []}], "extra": 1}"#,
        )?;
        jail.set_env("KCP_UPSTREAM__MAX_RETRYS", "2");
        let problems = problems(&Cli::default());
        assert_problem(
            &problems,
            &[
                "config.toml",
                "unknown field `sever` in the top level",
                "rename it to `server`",
            ],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "unknown field `wieght` in [[api_keys]] #1",
                "rename it to `weight`",
            ],
        );
        assert_problem(
            &problems,
            &[
                "config.json",
                "unknown field `extra`",
                "expected one of apiKeys",
            ],
        );
        assert_problem(
            &problems,
            &[
                "KCP_UPSTREAM__MAX_RETRYS",
                "unknown field `max_retrys` in [upstream]",
                "rename it to `max_retries`",
            ],
        );
        Ok(())
    });
}

#[test]
fn unknown_field_in_legacy_entry_names_the_file() {
    jail(|jail| {
        jail.create_file(
            "config.json",
            r#"{"apiKeys": [{"key": "sk-b", "modles": ["gpt-4"]}]}"#,
        )?;
        let problems = problems(&Cli::default());
        assert_problem(
            &problems,
            &[
                "config.json",
                "unknown field `modles` in apiKeys[0]",
                "rename it to `models`",
            ],
        );
        Ok(())
    });
}

#[test]
fn zero_timeouts_are_rejected_with_field_and_source() {
    jail(|jail| {
        jail.set_env("KCP_SERVER__BODY_READ_TIMEOUT_MS", "0");
        let problems = toml_problems(
            jail,
            r#"
            [server]
            header_read_timeout_ms = 0
            [upstream]
            connect_timeout_ms = 0
            request_timeout_ms = 0
            stream_idle_timeout_ms = 0
            "#,
        )?;
        for field in [
            "connect_timeout_ms",
            "request_timeout_ms",
            "stream_idle_timeout_ms",
        ] {
            assert_problem(
                &problems,
                &["config.toml", &format!("[upstream] {field} is 0")],
            );
        }
        assert_problem(
            &problems,
            &["config.toml", "[server] header_read_timeout_ms is 0"],
        );
        assert_problem(
            &problems,
            &[
                "KCP_SERVER__BODY_READ_TIMEOUT_MS",
                "[server] body_read_timeout_ms is 0",
                "default 30000",
            ],
        );
        assert_eq!(problems.len(), 5, "{problems:#?}");
        Ok(())
    });
}

#[test]
fn zero_sizes_are_rejected() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            "[server]\nrequest_body_limit_bytes = 0\nmax_inflight = 0\nmax_header_bytes = 100\n\
             worker_threads = 1025\n",
        )?;
        assert_problem(
            &problems,
            &["config.toml", "[server] request_body_limit_bytes is 0"],
        );
        assert_problem(&problems, &["config.toml", "[server] max_inflight is 0"]);
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[server] max_header_bytes is 100",
                "at least 8192",
            ],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[server] worker_threads is 1025",
                "at most 1024",
            ],
        );
        Ok(())
    });
}

#[test]
fn malformed_urls_are_rejected() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            r#"
            [upstream]
            base_url = "api.openai.com/v1"
            [cors]
            allowed_origins = ["https://app.example.com/path"]
            [[api_keys]]
            key = "sk-a"
            url = "ftp://files.example.com"
            [[api_keys]]
            key = "sk-b"
            url = "https://"
            "#,
        )?;
        assert_problem(
            &problems,
            &["config.toml", "[upstream] base_url has no scheme"],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[[api_keys]] #1 url must start with http:// or https://",
            ],
        );
        assert_problem(&problems, &["config.toml", "[[api_keys]] #2 url"]);
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[cors] allowed_origins[0] is not a bare origin",
            ],
        );
        Ok(())
    });
}

#[test]
fn empty_keys_are_rejected() {
    jail(|jail| {
        jail.create_file("config.json", r#"{"apiKeys": [{"key": "  ", "url": "https://api.openai.com/v1", "models": ["others"]}]}"#)?;
        let problems = toml_problems(jail, "[[api_keys]]\nkey = \"\"\n")?;
        assert_problem(&problems, &["config.toml", "[[api_keys]] #1 key is empty"]);
        assert_problem(&problems, &["config.json", "apiKeys[0] key is empty"]);
        Ok(())
    });
}

#[test]
fn key_and_key_env_must_be_exactly_one() {
    jail(|jail| {
        jail.set_env("SOME_KEY", "sk-x");
        let problems = toml_problems(
            jail,
            r#"
            [[api_keys]]
            key = "sk-a"
            key_env = "SOME_KEY"
            [[api_keys]]
            name = "nothing"
            "#,
        )?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[[api_keys]] #1 sets both key and key_env",
                "keep only one",
            ],
        );
        assert_problem(
            &problems,
            &["config.toml", "[[api_keys]] #2 has neither key nor key_env"],
        );
        Ok(())
    });
}

#[test]
fn key_env_must_name_a_set_variable() {
    jail(|jail| {
        jail.set_env("EMPTY_KEY", "  ");
        let problems = toml_problems(
            jail,
            "[[api_keys]]\nkey_env = \"MISSING_KEY\"\n[[api_keys]]\nkey_env = \"EMPTY_KEY\"\n",
        )?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[[api_keys]] #1 key_env names MISSING_KEY, which is not set",
                "export MISSING_KEY",
            ],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[[api_keys]] #2 key_env names EMPTY_KEY, which is empty",
            ],
        );
        Ok(())
    });
}

#[test]
fn unknown_strategy_and_log_format_are_rejected() {
    jail(|jail| {
        jail.set_env("KCP_OBSERVABILITY__LOG_FORMAT", "yaml");
        let problems = toml_problems(jail, "[keys]\nrotation_strategy = \"random\"\n")?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "unknown value `random` for [keys] rotation_strategy",
                "round_robin, round_robin_health_weighted, least_latency",
            ],
        );
        assert_problem(
            &problems,
            &[
                "KCP_OBSERVABILITY__LOG_FORMAT",
                "unknown value `yaml` for [observability] log_format",
                "text, json",
            ],
        );
        Ok(())
    });
}

#[test]
fn zero_weight_and_limits_are_rejected() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            "[[api_keys]]\nkey = \"sk-a\"\nweight = 0\nrpm = 0\ntpm = 0\n",
        )?;
        assert_problem(&problems, &["config.toml", "[[api_keys]] #1 weight is 0"]);
        assert_problem(&problems, &["config.toml", "[[api_keys]] #1 rpm is 0"]);
        assert_problem(&problems, &["config.toml", "[[api_keys]] #1 tpm is 0"]);
        Ok(())
    });
}

#[test]
fn rates_must_be_positive_and_finite() {
    jail(|jail| {
        let problems = toml_problems(jail, "[rate_limit]\nper_key_rps = 0\nglobal_rps = nan\n")?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[rate_limit] per_key_rps must be a finite number greater than 0",
            ],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[rate_limit] global_rps must be a finite number greater than 0",
            ],
        );
        Ok(())
    });
    jail(|jail| {
        let problems = toml_problems(jail, "[rate_limit]\nper_key_rps = -1.5\nglobal_rps = inf\n")?;
        assert_problem(&problems, &["config.toml", "[rate_limit] per_key_rps"]);
        assert_problem(&problems, &["config.toml", "[rate_limit] global_rps"]);
        Ok(())
    });
}

#[test]
fn zero_burst_is_rejected() {
    jail(|jail| {
        let problems = toml_problems(jail, "[rate_limit]\nburst = 0\n")?;
        assert_problem(&problems, &["config.toml", "[rate_limit] burst is 0"]);
        Ok(())
    });
}

#[test]
fn initial_backoff_must_not_exceed_max() {
    jail(|jail| {
        let problems = toml_problems(jail, "[upstream]\nretry_initial_backoff_ms = 3000\n")?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[upstream] retry_initial_backoff_ms (3000) is greater than [upstream] retry_max_backoff_ms (2000)",
            ],
        );
        Ok(())
    });
}

#[test]
fn duplicate_key_names_are_rejected() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            "[[api_keys]]\nkey = \"sk-a\"\nname = \"team\"\n[[api_keys]]\nkey = \"sk-b\"\nname = \"team\"\n",
        )?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[[api_keys]] #2: name `team` is already used by config.toml [[api_keys]] #1",
                "unique name",
            ],
        );
        Ok(())
    });
}

#[test]
fn listeners_must_not_share_a_port() {
    jail(|jail| {
        jail.create_file("config.toml", "[server]\nbind_addr = \"127.0.0.1:9300\"\n")?;
        jail.set_env("OPENAI_KEYS", "sk-a");
        let cli = Cli {
            metrics_bind: Some(addr("127.0.0.1:9300")),
            ..Cli::default()
        };
        assert_problem(
            &problems(&cli),
            &[
                "config.toml + --metrics-bind",
                "[server] bind_addr (127.0.0.1:9300) and [observability] metrics_bind (127.0.0.1:9300)",
            ],
        );
        let wildcard = Cli {
            bind: Some(addr("0.0.0.0:9090")),
            ..Cli::default()
        };
        assert_problem(&problems(&wildcard), &["--bind + default", "same port"]);

        let ephemeral = Cli {
            bind: Some(addr("127.0.0.1:0")),
            metrics_bind: Some(addr("127.0.0.1:0")),
            ..Cli::default()
        };
        assert!(load(&ephemeral).is_ok(), "port 0 never collides");
        Ok(())
    });
}

#[test]
fn missing_ca_file_is_rejected() {
    jail(|jail| {
        let problems = toml_problems(jail, "[upstream]\nca_file = \"/nonexistent/ca.pem\"\n")?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[upstream] ca_file /nonexistent/ca.pem does not exist",
            ],
        );
        Ok(())
    });
    jail(|jail| {
        jail.create_file("ca.pem", "-----BEGIN CERTIFICATE-----\n")?;
        jail.create_file("config.toml", "[upstream]\nca_file = \"ca.pem\"\n")?;
        jail.set_env("OPENAI_KEYS", "sk-a");
        let loaded = loaded(&Cli::default())?;
        assert_eq!(
            loaded.config.upstream.ca_file,
            Some(PathBuf::from("ca.pem"))
        );
        Ok(())
    });
}

#[test]
fn no_keys_at_all_is_rejected() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", " , ");
        let problems = problems(&Cli::default());
        assert_eq!(
            problems,
            [
                "no API keys configured; fix: add [[api_keys]] to config.toml, a config.json, or set OPENAI_KEYS=sk-...,sk-..."
            ]
        );
        Ok(())
    });
}

#[test]
fn other_bad_values_are_rejected() {
    jail(|jail| {
        jail.set_env("KCP_OBSERVABILITY__ADMIN_TOKEN", "");
        let problems = toml_problems(
            jail,
            r#"
            [observability]
            tracing_level = "verbose"
            [auth]
            client_keys = ["ok", ""]
            client_keys_env = "UNSET_TOKENS"
            [[api_keys]]
            key = "sk-a"
            models = []
            name = ""
            "#,
        )?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[observability] tracing_level `verbose` is not a log level",
            ],
        );
        assert_problem(
            &problems,
            &[
                "KCP_OBSERVABILITY__ADMIN_TOKEN",
                "[observability] admin_token is empty",
            ],
        );
        assert_problem(
            &problems,
            &["config.toml", "[auth] client_keys[1] is empty"],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[auth] client_keys_env names UNSET_TOKENS, which is not set",
            ],
        );
        assert_problem(
            &problems,
            &["config.toml", "[[api_keys]] #1 models is empty"],
        );
        assert_problem(&problems, &["config.toml", "[[api_keys]] #1 name is empty"]);
        Ok(())
    });
}

#[test]
fn wrong_types_name_field_without_quoting_the_value() {
    jail(|jail| {
        jail.create_file("config.json", r#"{"apiKeys": [{"key": 1234567890123}]}"#)?;
        jail.set_env("KCP_OBSERVABILITY__METRICS_BIND", "nonsense");
        let problems = toml_problems(
            jail,
            "[server]\nbind_addr = 8080\n[upstream]\nmax_retries = \"many\"\n",
        )?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[server] bind_addr has the wrong type: found an integer",
            ],
        );
        assert_problem(
            &problems,
            &[
                "config.toml",
                "[upstream] max_retries has the wrong type: found a string",
            ],
        );
        assert_problem(
            &problems,
            &[
                "KCP_OBSERVABILITY__METRICS_BIND",
                "[observability] metrics_bind",
                "IP:PORT",
            ],
        );
        assert_problem(
            &problems,
            &["config.json", "apiKeys[0] key has the wrong type"],
        );
        let all = problems.join("\n");
        assert!(
            !all.contains("1234567890123") && !all.contains("many"),
            "{all}"
        );
        Ok(())
    });
}

#[test]
fn all_problems_are_reported_at_once() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            "[server]\nbind_adr = \"x\"\n[upstream]\nconnect_timeout_ms = 0\n[rate_limit]\nburst = 0\n[keys]\nrotation_strategy = \"x\"\n",
        )?;
        assert_eq!(problems.len(), 4, "{problems:#?}");
        let error = load(&Cli::default()).expect_err("invalid");
        assert_eq!(error.to_string().lines().count(), 4);
        Ok(())
    });
}

#[test]
fn missing_explicit_files_are_rejected() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", "sk-a");
        let cli = Cli {
            config: Some(PathBuf::from("nope.toml")),
            keys_file: Some(PathBuf::from("nope.json")),
            ..Cli::default()
        };
        let problems = problems(&cli);
        assert_problem(&problems, &["--config", "nope.toml does not exist"]);
        assert_problem(&problems, &["--keys-file", "nope.json does not exist"]);
        Ok(())
    });
}

#[test]
fn explicit_config_path_is_used() {
    jail(|jail| {
        jail.create_dir("etc")?;
        jail.create_file("etc/kcp.toml", "[server]\nbind_adr = \"127.0.0.1:1\"\n")?;
        jail.set_env("OPENAI_KEYS", "sk-a");
        let cli = Cli {
            config: Some(PathBuf::from("etc/kcp.toml")),
            ..Cli::default()
        };
        assert_problem(
            &problems(&cli),
            &["etc/kcp.toml", "unknown field `bind_adr`"],
        );
        Ok(())
    });
}

#[test]
fn syntax_errors_never_quote_a_secret() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            "[[api_keys]]\nkey = \"sk-unterminated-secret\n",
        )?;
        jail.create_file(
            "config.json",
            "{\"apiKeys\": [{\"key\": \"sk-json-secret\" \"url\": 1}]}",
        )?;
        let problems = problems(&Cli::default());
        assert_problem(&problems, &["config.toml", "cannot be read", "line 2"]);
        assert_problem(&problems, &["config.json", "cannot be read", "line 1"]);
        let all = problems.join("\n");
        assert!(
            !all.contains("sk-unterminated-secret") && !all.contains("sk-json-secret"),
            "{all}"
        );
        Ok(())
    });
}

#[test]
fn api_keys_through_kcp_variables_are_refused() {
    jail(|jail| {
        jail.set_env("OPENAI_KEYS", "sk-a");
        jail.set_env("KCP_API_KEYS", "sk-b");
        let problems = problems(&Cli::default());
        assert_problem(&problems, &["KCP_API_KEYS", "use OPENAI_KEYS"]);
        assert!(!problems.join("\n").contains("sk-b"));
        Ok(())
    });
}

#[test]
fn render_effective_redacts_every_secret() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            r#"
            [observability]
            admin_token = "admin-token-raw"
            [auth]
            client_keys = ["client-token-raw"]
            [[api_keys]]
            key = "sk-render-named-raw"
            name = "named-key"
            models = ["gpt-4o"]
            "#,
        )?;
        jail.set_env("OPENAI_KEYS", "sk-render-env-raw");
        let loaded = loaded(&Cli::default())?;
        let rendered = render_effective(&loaded);
        for raw in [
            "admin-token-raw",
            "client-token-raw",
            "sk-render-named-raw",
            "sk-render-env-raw",
        ] {
            assert!(!rendered.contains(raw), "{raw} leaked:\n{rendered}");
        }
        assert!(rendered.contains("named-key"));
        for key in &loaded.keys {
            assert!(rendered.contains(&key.secret.fingerprint()));
        }
        assert!(rendered.contains("[redacted]"));
        assert!(rendered.contains("gpt-4o") && rendered.contains("https://api.openai.com/v1"));
        assert!(
            rendered.contains("2 keys: 1 from config.toml, 0 from config.json, 1 from OPENAI_KEYS")
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&rendered).map_err(|e| e.to_string())?;
        assert_eq!(parsed["config"]["server"]["bind_addr"], "127.0.0.1:8080");
        assert_eq!(parsed["client_keys"], 1);

        let debug = format!("{loaded:?}");
        assert!(!debug.contains("raw"), "Debug leaked a secret: {debug}");
        Ok(())
    });
}

#[test]
fn example_files_load() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            include_str!("../../../../config/kcp.example.toml"),
        )?;
        jail.create_file(
            "config.json",
            include_str!("../../../../config/config.example.json"),
        )?;
        let loaded = loaded(&Cli::default())?;
        assert_eq!(loaded.config.server, ServerSection::default());
        assert_eq!(loaded.config.upstream, UpstreamSection::default());
        assert_eq!(loaded.config.keys, KeysSection::default());
        assert_eq!(loaded.config.rate_limit, RateLimitSection::default());
        assert_eq!(loaded.config.observability, ObservabilitySection::default());
        assert_eq!(loaded.config.cors, CorsSection::default());
        assert_eq!(
            exposed(&loaded.keys),
            [
                "sk-your-team-a-key",
                "sk-your-team-b-key",
                "sk-your-openai-key-1",
                "sk-your-openai-key-2",
                "sk-your-proxy-key"
            ]
        );
        assert_eq!((loaded.sources.toml, loaded.sources.json), (2, 3));
        Ok(())
    });
}

#[test]
fn config_deserializes_strictly_on_its_own() {
    let parsed: Result<Config, _> =
        figment::Figment::from(figment::providers::Serialized::defaults(Config::default()))
            .extract();
    assert!(parsed.is_ok());
    let typo = figment::Figment::from(figment::providers::Serialized::default(
        "server.bind_adr",
        "x",
    ))
    .extract::<Config>();
    assert!(typo.is_err());
}

#[test]
fn open_proxy_off_loopback_needs_client_keys_or_allow_anonymous() {
    jail(|jail| {
        // The original key-cycle-proxy's setup: every interface, no client auth.
        let found = toml_problems(jail, "[server]\nbind_addr = \"0.0.0.0:8080\"\n")?;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_problem(
            &found,
            &[
                "config.toml",
                "bind_addr 0.0.0.0:8080 is not a loopback address",
                "[auth] client_keys (or client_keys_env)",
                "[auth] allow_anonymous = true",
            ],
        );
        let flag = Cli {
            bind: Some(addr("[::]:8080")),
            ..Cli::default()
        };
        jail.create_file("config.toml", "")?;
        assert_problem(&problems(&flag), &["--bind", "allow_anonymous"]);

        jail.create_file(
            "config.toml",
            "[server]\nbind_addr = \"0.0.0.0:8080\"\n[auth]\nallow_anonymous = true\n",
        )?;
        assert_eq!(
            loaded(&Cli::default())?.config.server.bind_addr,
            addr("0.0.0.0:8080")
        );
        assert_eq!(loaded(&flag)?.config.server.bind_addr, addr("[::]:8080"));

        jail.create_file(
            "config.toml",
            "[server]\nbind_addr = \"0.0.0.0:8080\"\n[auth]\nclient_keys = [\"kcp-t\"]\n",
        )?;
        assert_eq!(loaded(&Cli::default())?.client_keys.len(), 1);

        for loopback in ["127.0.0.1:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
            let cli = Cli {
                bind: Some(addr(loopback)),
                ..Cli::default()
            };
            jail.create_file("config.toml", "")?;
            assert_eq!(loaded(&cli)?.config.server.bind_addr, addr(loopback));
        }
        Ok(())
    });
}

#[test]
fn secure_defaults() {
    let config = Config::default();
    assert!(config.server.bind_addr.ip().is_loopback());
    assert!(config.cors.allowed_origins.is_empty());
    assert!(!config.auth.allow_anonymous);
    assert_eq!(config.server.body_timeout_ms, 60_000);
}

#[test]
fn azure_keys_in_toml_and_legacy_json() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            r#"
            [[api_keys]]
            key = "sk-openai"
            url = "https://api.openai.com"

            [[api_keys]]
            key = "az-v1"
            kind = "azure"
            url = "https://res.openai.azure.com/openai/v1/"

            [[api_keys]]
            key = "az-classic"
            kind = "azure"
            url = "https://res.openai.azure.com"
            api_version = "2024-10-21"
            deployments = { "gpt-4o" = "prod-4o" }
            "#,
        )?;
        jail.create_file(
            "config.json",
            r#"{"apiKeys": [{"key": "az-json", "url": "https://r2.openai.azure.com", "kind": "azure", "apiVersion": "2024-10-21", "deployments": {"gpt-4o-mini": "mini"}}]}"#,
        )?;
        let config = loaded(&Cli::default())?;
        let keys = &config.keys;
        assert_eq!(
            exposed(keys),
            ["sk-openai", "az-v1", "az-classic", "az-json"]
        );
        let kinds: Vec<KeyKind> = keys.iter().map(|k| k.kind).collect();
        assert_eq!(
            kinds,
            [
                KeyKind::OpenAi,
                KeyKind::Azure,
                KeyKind::Azure,
                KeyKind::Azure
            ]
        );
        assert_eq!(keys[0].url, "https://api.openai.com/v1");
        assert_eq!(keys[1].url, "https://res.openai.azure.com/openai/v1");
        assert_eq!(keys[1].api_version, None);
        assert_eq!(keys[2].api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(keys[2].deployment("gpt-4o"), "prod-4o");
        assert_eq!(keys[3].api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(keys[3].deployment("gpt-4o-mini"), "mini");
        let effective: serde_json::Value =
            serde_json::from_str(&render_effective(&config)).expect("JSON");
        let classic = &effective["api_keys"][2];
        assert_eq!(classic["kind"], "azure");
        assert_eq!(classic["api_version"], "2024-10-21");
        assert_eq!(classic["deployments"]["gpt-4o"], "prod-4o");
        assert_eq!(effective["api_keys"][0].get("deployments"), None);
        Ok(())
    });
}

#[test]
fn azure_settings_are_checked() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            r#"
            [[api_keys]]
            key = "sk-a"
            api_version = "2024-10-21"

            [[api_keys]]
            key = "az-b"
            kind = "azure"
            deployments = { "gpt-4o" = "prod" }

            [[api_keys]]
            key = "az-c"
            kind = "azure"
            api_version = "2024-10-21"
            deployments = { "gpt-4o" = "prod/../x" }

            [[api_keys]]
            key = "az-d"
            kind = "azur"
            "#,
        )?;
        assert_problem(
            &problems,
            &["[[api_keys]] #1", "only an Azure key", "kind = \"azure\""],
        );
        assert_problem(&problems, &["[[api_keys]] #2", "without api_version"]);
        assert_problem(
            &problems,
            &[
                "[[api_keys]] #3",
                "deployment `prod/../x` of model `gpt-4o`",
            ],
        );
        assert_problem(&problems, &["[[api_keys]] #4", "azur"]);
        Ok(())
    });
}

#[test]
fn cluster_section_rejects_unknown_fields_and_bad_values() {
    jail(|jail| {
        let problems = toml_problems(
            jail,
            "[cluster]\nredis_uri = \"redis://127.0.0.1:6379\"\nnamespace = \"kcp\"\n",
        )?;
        assert_problem(
            &problems,
            &[
                "config.toml",
                "unknown field `redis_uri` in [cluster]",
                "rename it to `redis_url`",
            ],
        );
        let problems = toml_problems(
            jail,
            "[cluster]\nredis_url = \"http://127.0.0.1:6379\"\nnamespace = \"\"\nredis_password_env = \"TEST_CLUSTER_UNSET_PASSWORD\"\n",
        )?;
        assert_problem(&problems, &["[cluster] redis_url", "redis://"]);
        assert_problem(&problems, &["[cluster] namespace", "non-empty word"]);
        assert_problem(
            &problems,
            &[
                "[cluster] redis_password_env",
                "TEST_CLUSTER_UNSET_PASSWORD",
            ],
        );
        for line in &problems {
            assert!(!line.contains("http://127.0.0.1"), "url shown: {line}");
        }
        Ok(())
    });
}

#[test]
fn cluster_redis_url_and_password_are_redacted_in_check_config_and_debug() {
    jail(|jail| {
        jail.create_file(
            "config.toml",
            r#"
            [cluster]
            redis_url = "redis://:cluster-pass-raw@redis.internal:6379/0"
            redis_password_env = "TEST_CLUSTER_REDIS_PASSWORD"
            namespace = "kcp-prod"
            replica_id = "kcp-1"
            "#,
        )?;
        jail.set_env("OPENAI_KEYS", "sk-env");
        jail.set_env("TEST_CLUSTER_REDIS_PASSWORD", "env-pass-raw");
        let loaded = loaded(&Cli::default())?;
        let cluster = loaded.config.cluster.as_ref().expect("[cluster] loaded");
        assert_eq!(cluster.namespace, "kcp-prod");
        assert_eq!(cluster.replica(), "kcp-1");
        let rendered = render_effective(&loaded);
        assert!(rendered.contains("kcp-prod"), "{rendered}");
        let debug = format!("{loaded:?} {cluster:?}");
        for raw in ["cluster-pass-raw", "env-pass-raw", "redis.internal"] {
            assert!(!rendered.contains(raw), "{raw} leaked:\n{rendered}");
            assert!(!debug.contains(raw), "Debug leaked {raw}: {debug}");
        }
        Ok(())
    });
}
