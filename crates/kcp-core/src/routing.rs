//! Model routing: which keys may serve a request for model M.
//!
//! A key names models by exact name, by glob (`gpt-4o*`, `?` for one character), or with
//! the fallback markers `others` / `*`. A request for M goes to the keys that name M; only
//! when no key names M does it go to the fallback keys. A request without a model (model
//! lists, file endpoints) may use any key, fallback keys first.
//!
//! The table is built once per pool. A lookup hashes the model once and returns borrowed
//! slices, so it never allocates: every model named exactly in the config has its key list
//! (including keys whose globs match it) precomputed; an unnamed model that matches globs
//! is served by the keys of those globs through a bit mask over the glob patterns.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Index of a key in its pool.
pub type KeyIndex = u32;

/// The most distinct glob patterns one pool may hold (one bit each in a `u64`).
pub const MAX_GLOBS: usize = 64;

/// One model pattern of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPattern {
    /// An exact model name.
    Exact(String),
    /// A glob with `*` and `?`.
    Glob(String),
    /// `others` or `*`: serves models no key names.
    Fallback,
}

impl ModelPattern {
    /// Classifies one configured pattern.
    pub fn parse(pattern: &str) -> ModelPattern {
        let pattern = pattern.trim();
        if pattern == "others" || pattern == "*" {
            ModelPattern::Fallback
        } else if pattern.contains(['*', '?']) {
            ModelPattern::Glob(pattern.to_owned())
        } else {
            ModelPattern::Exact(pattern.to_owned())
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run and `?` any one byte.
/// Works on bytes (model names are ASCII) with single-star backtracking: linear-ish, no allocation.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A set of candidate keys: a slice, optionally filtered by a glob mask.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    /// The keys, in config order.
    pub keys: &'a [KeyIndex],
    /// When non-zero, only keys whose glob mask shares a bit with it.
    pub mask: u64,
    masks: &'a [u64],
}

impl<'a> Candidates<'a> {
    fn plain(keys: &'a [KeyIndex]) -> Self {
        Self {
            keys,
            mask: 0,
            masks: &[],
        }
    }

    /// Whether the candidate at position `i` of `keys` is really in the set.
    pub fn admits(&self, key: KeyIndex) -> bool {
        self.mask == 0
            || self
                .masks
                .get(key as usize)
                .is_some_and(|m| m & self.mask != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys of the set, in config order.
    pub fn iter(&self) -> impl Iterator<Item = KeyIndex> + '_ {
        self.keys.iter().copied().filter(|&k| self.admits(k))
    }
}

/// The keys that may serve one request, in order of preference.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    /// Tried first.
    pub primary: Candidates<'a>,
    /// Tried when no primary key can take the request (only for requests without a model).
    pub secondary: Candidates<'a>,
}

impl Route<'_> {
    /// Whether no key at all can serve the request.
    pub fn is_empty(&self) -> bool {
        self.primary.is_empty() && self.secondary.is_empty()
    }

    /// Every candidate, primary first; a key may appear in both tiers.
    pub fn tiers(&self) -> [Candidates<'_>; 2] {
        [self.primary, self.secondary]
    }
}

/// Too many distinct glob patterns for one pool.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} distinct model globs configured; at most {MAX_GLOBS} are supported: list models by name instead"
)]
pub struct TooManyGlobs(pub usize);

/// Model → candidate keys, built once per pool.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<Box<str>, Box<[KeyIndex]>, BuildHasherDefault<Fnv>>,
    globs: Vec<Box<str>>,
    glob_masks: Box<[u64]>,
    globbed: Box<[KeyIndex]>,
    fallback: Box<[KeyIndex]>,
    non_fallback: Box<[KeyIndex]>,
}

impl RouteTable {
    /// Builds the table from each key's patterns (index = key index).
    pub fn build<S: AsRef<str>>(models: &[Vec<S>]) -> Result<RouteTable, TooManyGlobs> {
        let patterns: Vec<Vec<ModelPattern>> = models
            .iter()
            .map(|m| m.iter().map(|p| ModelPattern::parse(p.as_ref())).collect())
            .collect();
        let mut globs: Vec<Box<str>> = Vec::new();
        let mut glob_masks = vec![0u64; patterns.len()];
        let mut exact: HashMap<Box<str>, Vec<KeyIndex>> = HashMap::new();
        let (mut fallback, mut non_fallback) = (Vec::new(), Vec::new());
        for (key, pats) in patterns.iter().enumerate() {
            let index = key as KeyIndex;
            for pat in pats {
                match pat {
                    ModelPattern::Exact(name) => {
                        exact.entry(name.as_str().into()).or_default().push(index)
                    }
                    ModelPattern::Glob(glob) => {
                        let bit = match globs.iter().position(|g| **g == **glob) {
                            Some(bit) => bit,
                            None => {
                                globs.push(glob.as_str().into());
                                globs.len() - 1
                            }
                        };
                        if bit >= MAX_GLOBS {
                            return Err(TooManyGlobs(globs.len()));
                        }
                        glob_masks[key] |= 1 << bit;
                    }
                    ModelPattern::Fallback => {}
                }
            }
            if pats.contains(&ModelPattern::Fallback) {
                fallback.push(index);
            } else {
                non_fallback.push(index);
            }
        }
        let globbed: Vec<KeyIndex> = (0..patterns.len() as KeyIndex)
            .filter(|&k| glob_masks[k as usize] != 0)
            .collect();
        let exact = exact
            .into_iter()
            .map(|(model, mut keys)| {
                let mask = glob_mask_for(&globs, &model);
                keys.extend(
                    globbed
                        .iter()
                        .filter(|&&k| glob_masks[k as usize] & mask != 0),
                );
                keys.sort_unstable();
                keys.dedup();
                (model, keys.into_boxed_slice())
            })
            .collect();
        Ok(RouteTable {
            exact,
            globs,
            glob_masks: glob_masks.into_boxed_slice(),
            globbed: globbed.into_boxed_slice(),
            fallback: fallback.into_boxed_slice(),
            non_fallback: non_fallback.into_boxed_slice(),
        })
    }

    /// The keys that may serve a request for `model` (`None`: the request names no model).
    pub fn lookup(&self, model: Option<&str>) -> Route<'_> {
        let empty = Candidates::plain(&[]);
        let Some(model) = model else {
            return Route {
                primary: Candidates::plain(&self.fallback),
                secondary: Candidates::plain(&self.non_fallback),
            };
        };
        let primary = if let Some(keys) = self.exact.get(model) {
            Candidates::plain(keys)
        } else {
            match glob_mask_for(&self.globs, model) {
                0 => Candidates::plain(&self.fallback),
                mask => Candidates {
                    keys: &self.globbed,
                    mask,
                    masks: &self.glob_masks,
                },
            }
        };
        Route {
            primary,
            secondary: empty,
        }
    }

    /// Whether any key names `model` exactly or by glob (as opposed to serving it as fallback).
    pub fn names(&self, model: &str) -> bool {
        self.exact.contains_key(model) || glob_mask_for(&self.globs, model) != 0
    }

    /// Every model named exactly by some key (bounded metric labels).
    pub fn named_models(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(|m| &**m)
    }
}

/// FNV-1a (Fowler, Noll, Vo) for the model table: a few nanoseconds for a short model
/// name where SipHash takes several times that. Flooding is not a concern: the table is
/// built from the config and never grows from requests, so client-chosen names can only
/// miss it, never degrade it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn glob_mask_for(globs: &[Box<str>], model: &str) -> u64 {
    globs
        .iter()
        .enumerate()
        .filter(|(_, g)| glob_matches(g, model))
        .fold(0, |mask, (bit, _)| mask | 1 << bit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(models: &[&[&str]]) -> RouteTable {
        let models: Vec<Vec<&str>> = models.iter().map(|m| m.to_vec()).collect();
        RouteTable::build(&models).expect("few globs")
    }

    fn keys(route: Route<'_>) -> (Vec<KeyIndex>, Vec<KeyIndex>) {
        (
            route.primary.iter().collect(),
            route.secondary.iter().collect(),
        )
    }

    #[test]
    fn globs() {
        assert!(glob_matches("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_matches("gpt-4o*", "gpt-4o"));
        assert!(!glob_matches("gpt-4o*", "gpt-4"));
        assert!(glob_matches("gpt-?", "gpt-4"));
        assert!(glob_matches("*-mini", "o4-mini"));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
    }

    #[test]
    fn named_models_beat_fallback() {
        let t = table(&[&["gpt-4"], &["others"], &["gpt-4o*"], &["gpt-4o", "*"]]);
        assert_eq!(keys(t.lookup(Some("gpt-4"))).0, vec![0]);
        assert_eq!(keys(t.lookup(Some("gpt-4o"))).0, vec![2, 3]);
        assert_eq!(keys(t.lookup(Some("gpt-4o-mini"))).0, vec![2]);
        assert_eq!(keys(t.lookup(Some("whisper-1"))).0, vec![1, 3]);
        assert!(t.names("gpt-4o-mini"));
        assert!(!t.names("whisper-1"));
    }

    #[test]
    fn named_models_are_the_exact_names_only() {
        let t = table(&[&["gpt-4"], &["others"], &["gpt-4o*"], &["gpt-4o", "*"]]);
        let mut named: Vec<&str> = t.named_models().collect();
        named.sort_unstable();
        assert_eq!(named, ["gpt-4", "gpt-4o"], "no glob, no fallback");
    }

    #[test]
    fn the_model_table_hashes_with_fnv_1a() {
        // Reference values of 64-bit FNV-1a.
        for (text, hash) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            let mut h = Fnv::default();
            h.write(text.as_bytes());
            assert_eq!(h.finish(), hash, "{text:?}");
        }
    }

    #[test]
    fn no_model_prefers_fallback_keys_then_any() {
        let t = table(&[&["gpt-4"], &["others"], &["gpt-4o*"]]);
        assert_eq!(keys(t.lookup(None)), (vec![1], vec![0, 2]));
    }

    #[test]
    fn no_fallback_means_no_route() {
        let t = table(&[&["gpt-4"]]);
        assert!(t.lookup(Some("gpt-3.5-turbo")).is_empty());
    }

    #[test]
    fn overlapping_globs_union() {
        let t = table(&[&["gpt-*"], &["*-mini"], &["o1*"]]);
        assert_eq!(keys(t.lookup(Some("gpt-4o-mini"))).0, vec![0, 1]);
    }

    #[test]
    fn too_many_globs_is_an_error() {
        let many: Vec<Vec<String>> = (0..65).map(|i| vec![format!("m{i}*")]).collect();
        assert!(RouteTable::build(&many).is_err());
    }

    fn pattern() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("others".to_owned()),
            Just("*".to_owned()),
            "[ab]{1,3}",
            "[ab]{0,2}\\*",
            "\\*[ab]{1,2}",
        ]
    }

    proptest! {
        /// A model is only ever served by a key that names it, or by a fallback key when none does.
        #[test]
        fn routing_respects_names(
            models in prop::collection::vec(prop::collection::vec(pattern(), 1..4), 1..8),
            model in "[ab]{1,3}",
        ) {
            let t = RouteTable::build(&models).expect("few globs");
            let parsed: Vec<Vec<ModelPattern>> = models.iter().map(|m| m.iter().map(|p| ModelPattern::parse(p)).collect()).collect();
            let names = |k: &Vec<ModelPattern>| k.iter().any(|p| match p {
                ModelPattern::Exact(e) => *e == model,
                ModelPattern::Glob(g) => glob_matches(g, &model),
                ModelPattern::Fallback => false,
            });
            let expected: Vec<KeyIndex> = if parsed.iter().any(names) {
                (0..parsed.len()).filter(|&k| names(&parsed[k])).map(|k| k as KeyIndex).collect()
            } else {
                (0..parsed.len()).filter(|&k| parsed[k].contains(&ModelPattern::Fallback)).map(|k| k as KeyIndex).collect()
            };
            let (primary, secondary) = keys(t.lookup(Some(&model)));
            prop_assert_eq!(primary, expected);
            prop_assert!(secondary.is_empty());
        }
    }
}
