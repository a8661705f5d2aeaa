//! Parsing JSON as deep as Node nests it.
//!
//! `serde_json` refuses documents nested more than 128 levels deep, but Node writes up to about
//! 4,000 (`JSON.stringify` runs out of stack there) and reads far deeper. So every parse here
//! first takes `serde_json`'s fast path and, only if that hit its recursion limit, parses again
//! without the limit on a stack that grows as needed (`serde_stacker`), which stays safe however
//! deep the input. How deep a peer may go is bounded by
//! [`ChannelConfig::max_depth`](super::ChannelConfig::max_depth): past 128 levels, a one-pass
//! count of the depth decides before the second parse.

use serde::de::{Deserialize, DeserializeSeed, Deserializer};

/// Default deepest nesting accepted from a peer (arrays and objects): 1,000 levels.
///
/// Node's `JSON.stringify` writes up to about 4,000 levels of arrays; raise
/// [`ChannelConfig::max_depth`](super::ChannelConfig::max_depth) to accept those. handoff itself
/// parses any depth safely, but a `serde_json::Value` is dropped recursively: about 800 bytes of
/// stack per level of objects in a debug build, so 2,500 levels exhaust a 2 MiB tokio worker
/// thread. 1,000 keeps `Message::value()` safe everywhere.
pub const DEFAULT_MAX_DEPTH: usize = 1_000;

/// How deeply `text` nests arrays and objects, counted in one pass over the bytes (brackets
/// inside strings do not count). Meaningful for valid JSON; cheap for anything.
pub(crate) fn depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Whether `error` is `serde_json`'s refusal to go deeper than 128 levels.
fn is_recursion_limit(error: &serde_json::Error) -> bool {
    error.to_string().starts_with("recursion limit exceeded")
}

/// Why [`deserialize_seed_within`] failed.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Not valid JSON (or not of the expected shape).
    Json(serde_json::Error),
    /// Nested deeper than allowed.
    TooDeep,
}

/// Runs `seed` over `text` (the whole of it), as deep as the text goes if that is at most
/// `max_depth` levels.
pub(crate) fn deserialize_seed_within<'de, S: DeserializeSeed<'de> + Clone>(
    text: &'de str,
    seed: S,
    max_depth: usize,
) -> Result<S::Value, Refused> {
    let mut de = serde_json::Deserializer::from_str(text);
    match seed.clone().deserialize(&mut de).and_then(|value| de.end().map(|()| value)) {
        Err(e) if is_recursion_limit(&e) => {
            if depth(text.as_bytes()) > max_depth {
                return Err(Refused::TooDeep);
            }
            let mut de = serde_json::Deserializer::from_str(text);
            de.disable_recursion_limit();
            let value =
                seed.deserialize(serde_stacker::Deserializer::new(&mut de)).map_err(Refused::Json)?;
            de.end().map_err(Refused::Json)?;
            Ok(value)
        }
        result => result.map_err(Refused::Json),
    }
}

/// `serde_json::from_str`, as deep as the text goes. Use it on text whose depth was bounded
/// already (every message a channel delivers).
pub fn from_str<'de, T: Deserialize<'de>>(text: &'de str) -> serde_json::Result<T> {
    deserialize_seed_within(text, std::marker::PhantomData::<T>, usize::MAX).map_err(|e| match e {
        Refused::Json(e) => e,
        Refused::TooDeep => unreachable!("no depth is too deep for usize::MAX"),
    })
}

/// `Deserializer::deserialize_any` with `visitor`, at most `max_depth` levels deep.
pub(crate) fn deserialize_any_within<'de, V>(
    text: &'de str,
    visitor: V,
    max_depth: usize,
) -> Result<V::Value, Refused>
where
    V: serde::de::Visitor<'de> + Clone,
{
    #[derive(Clone)]
    struct Any<V>(V);
    impl<'de, V: serde::de::Visitor<'de>> DeserializeSeed<'de> for Any<V> {
        type Value = V::Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            d.deserialize_any(self.0)
        }
    }
    deserialize_seed_within(text, Any(visitor), max_depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(depth(b"1"), 0);
        assert_eq!(depth(br#"[{"a":[1]}]"#), 3);
        assert_eq!(depth(br#"["[[[", "\"[{"]"#), 1);
        assert_eq!(depth(br#"{"k\\":["x"]}"#), 2);
    }

    #[test]
    fn parses_deeper_than_serde_json_alone() {
        let text = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
        let value: serde_json::Value = from_str(&text).unwrap();
        let mut level = &value;
        let mut levels = 1;
        while let Some(inner) = level.as_array().and_then(|a| a.first()) {
            level = inner;
            levels += 1;
        }
        assert_eq!(levels, 5000);
        // Dropping a 5,000-deep Value recurses too; let it go on a big stack.
        std::thread::Builder::new().stack_size(64 << 20).spawn(move || drop(value)).unwrap().join().unwrap();
    }
}
