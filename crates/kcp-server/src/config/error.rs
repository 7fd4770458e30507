//! Configuration problems, worded so an operator can fix them in one round trip.
//!
//! Each [`Problem`] is one line: where the value came from (a file, an environment variable, a
//! flag), what is wrong with which field, and how to fix it. `load` collects every problem it
//! finds before giving up. None of them quotes a configured value that could be a secret:
//! figment's errors are re-worded here without the offending value, and the source snippets
//! that TOML parse errors carry are dropped.

use std::fmt;

use figment::error::{Actual, Kind};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Who supplied the bad value: a file path, an environment variable or a flag. `None` for
    /// a problem of the configuration as a whole (for example: no API keys at all).
    pub source: Option<String>,
    /// What is wrong, naming the field.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

impl Problem {
    pub(super) fn new(
        source: Option<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            source,
            message: one_line(&message.into()),
            fix: one_line(&fix.into()),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(source) = &self.source {
            write!(f, "{source}: ")?;
        }
        write!(f, "{}; fix: {}", self.message, self.fix)
    }
}

/// Why the configuration was rejected. The server refuses to start (or keeps its previous
/// configuration on reload) and exits with [`ConfigError::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One or more problems; `Display` prints one per line.
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Process exit code for a configuration error (`EX_USAGE` from sysexits.h).
    pub const EXIT_CODE: i32 = 64;

    /// Every problem found.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid(problems) => problems,
        }
    }
}

fn lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

/// Re-words a figment deserialization error as `(message, fix)` without quoting the value.
/// `place` names the errored value's container as operators write it (`[server]`,
/// `[[api_keys]] #2`); `path` is the error's path below that container.
pub(super) fn reword(kind: &Kind, place: &str, path: &[String]) -> (String, String) {
    let at = locate(place, container(kind, path));
    match kind {
        Kind::UnknownField(field, expected) => {
            let fix = match closest(field, expected) {
                Some(name) => format!("rename it to `{name}`"),
                None => "remove it".to_owned(),
            };
            let message = format!(
                "unknown field `{field}` in {at}; expected one of {}",
                expected.join(", ")
            );
            (message, fix)
        }
        Kind::UnknownVariant(value, expected) => (
            format!(
                "unknown value `{value}` for {at}; expected one of {}",
                expected.join(", ")
            ),
            "use one of the listed values".to_owned(),
        ),
        Kind::InvalidType(actual, expected) => (
            format!(
                "{at} has the wrong type: found {}, expected {expected}",
                type_name(actual)
            ),
            format!("write {at} as {expected}"),
        ),
        Kind::InvalidValue(_, expected) => (
            format!("{at} has an invalid value; expected {expected}"),
            format!("set {at} to {expected}"),
        ),
        Kind::InvalidLength(len, expected) => (
            format!("{at} has {len} items; expected {expected}"),
            format!("give {at} {expected}"),
        ),
        Kind::MissingField(field) => (
            format!("missing field `{field}` in {at}"),
            format!("add `{field}`"),
        ),
        Kind::DuplicateField(field) => (
            format!("field `{field}` appears twice in {at}"),
            "keep one of them".to_owned(),
        ),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => (
            format!("{at} is out of range"),
            format!("set {at} to a smaller number"),
        ),
        Kind::Unsupported(actual) | Kind::UnsupportedKey(actual, _) => (
            format!("{at} has an unsupported {}", type_name(actual)),
            format!("check the type of {at}"),
        ),
        Kind::Message(message) => {
            let fix = if message.contains("socket address") {
                format!("write {at} as IP:PORT, e.g. 127.0.0.1:8080")
            } else {
                format!("correct {at}")
            };
            (format!("{at}: {}", one_line(message)), fix)
        }
    }
}

/// The path of the value that holds the error: figment puts an unknown field's own name at the
/// end of some paths, and the message names it separately.
pub(super) fn container<'a>(kind: &Kind, path: &'a [String]) -> &'a [String] {
    match (kind, path.split_last()) {
        (Kind::UnknownField(field, _), Some((last, rest))) if last == field => rest,
        _ => path,
    }
}

/// `place` followed by `path`: `[cors]` + `allowed_origins`, `0` → `[cors] allowed_origins[0]`.
fn locate(place: &str, path: &[String]) -> String {
    let mut out = place.to_owned();
    for segment in path {
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(segment);
        }
    }
    if out.is_empty() {
        out.push_str("the top level");
    }
    out
}

/// The kind of value serde found, never the value itself.
fn type_name(actual: &Actual) -> &'static str {
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "an empty value",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "value",
    }
}

/// The expected name within edit distance 2 of `name`, to suggest for a typo.
fn closest<'a>(name: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|candidate| (edit_distance(name, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, by the classic two-row dynamic program.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Collapses a multi-line parser message to one line, dropping the quoted source lines
/// (`2 | key = "sk-…"`) that could contain a secret.
pub(super) fn one_line(message: &str) -> String {
    let kept: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !is_snippet(line))
        .collect();
    kept.join(": ")
}

fn is_snippet(line: &str) -> bool {
    line.trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start()
        .starts_with('|')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_snippets_are_dropped() {
        let raw = "TOML parse error at line 2, column 7\n  |\n2 | key = \"sk-secret\n  |       ^\ninvalid basic string\n";
        let line = one_line(raw);
        assert_eq!(
            line,
            "TOML parse error at line 2, column 7: invalid basic string"
        );
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(
            closest("bind_adr", &["bind_addr", "max_inflight"]),
            Some("bind_addr")
        );
        assert_eq!(closest("zzzzzz", &["bind_addr"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn paths_read_like_the_file() {
        let path = vec!["allowed_origins".to_owned(), "0".to_owned()];
        assert_eq!(locate("[cors]", &path), "[cors] allowed_origins[0]");
        assert_eq!(locate("", &[]), "the top level");
    }

    #[test]
    fn error_prints_one_problem_per_line() {
        let error = ConfigError::Invalid(vec![
            Problem::new(Some("config.toml".into()), "a is wrong", "fix a"),
            Problem::new(None, "b is\nwrong", "fix b"),
        ]);
        assert_eq!(
            error.to_string(),
            "config.toml: a is wrong; fix: fix a\nb is: wrong; fix: fix b"
        );
        assert_eq!(ConfigError::EXIT_CODE, 64);
    }
}
