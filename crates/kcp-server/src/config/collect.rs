//! Deserializing a table while collecting every field error, not just the first.
//!
//! serde stops at the first bad field, so a file with three typos would take three restarts
//! to fix. Here each rejected field is removed and the table deserialized again, until it
//! succeeds or the error cannot be pinned to a field. Rejected fields fall back to their
//! defaults, so the remaining values can still be checked in the same pass.

use figment::error::Kind;
use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;

/// Deserializes `table`; returns the value (if it could be salvaged) and every error.
pub(super) fn deserialize_all<T: DeserializeOwned>(
    table: &Dict,
) -> (Option<T>, Vec<figment::Error>) {
    let mut table = table.clone();
    let mut errors = Vec::new();
    // Each round removes one field, so this terminates; the bound makes that obvious.
    for _ in 0..=table.len() {
        let error = match Value::from(table.clone()).deserialize::<T>() {
            Ok(value) => return (Some(value), errors),
            Err(error) => error,
        };
        let field = match &error.kind {
            Kind::UnknownField(field, _) => Some(field.clone()),
            _ => error.path.first().cloned(),
        };
        errors.push(error);
        match field {
            Some(field) if table.remove(&field).is_some() => {}
            _ => break,
        }
    }
    (None, errors)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Table {
        a: u32,
        b: String,
    }

    #[test]
    fn every_bad_field_is_reported_and_the_rest_kept() {
        let mut table = Dict::new();
        table.insert("a".into(), Value::from("not a number"));
        table.insert("b".into(), Value::from("kept"));
        table.insert("c".into(), Value::from(1u32));
        table.insert("d".into(), Value::from(2u32));
        let (value, errors) = deserialize_all::<Table>(&table);
        assert_eq!(
            value,
            Some(Table {
                a: 0,
                b: "kept".into()
            })
        );
        assert_eq!(errors.len(), 3);
    }
}
