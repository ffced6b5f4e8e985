//! serde's and the YAML parser's messages, in the words of someone who writes YAML.
//!
//! serde speaks of the Rust types a file is read into ("invalid type: string \"alpha\",
//! expected struct Origin", "expected u32", "unknown field"); an admin thinks in mappings,
//! lists, numbers and keys. [`plain`] rewrites those phrases; the value types of `units.rs`
//! already fail in plain words and pass through untouched. [`quote_hint`] explains the YAML
//! syntax error an unquoted cron expression (or any value starting with `*`, `@` or `` ` ``)
//! causes, which on its own reads like nonsense ("while scanning an alias").

/// `message` (serde's, without its position) as an admin reads it; `key` is the key it is
/// about, when known.
pub fn plain(message: &str, key: Option<&str>) -> String {
    let leaf = key.map(|k| k.rsplit(['.', '[']).next().unwrap_or(k).trim_end_matches(']'));
    if let Some(example) = key.and_then(address_example) {
        // `std::net::SocketAddr`'s own message is "invalid socket address syntax".
        return format!("not an IP address and port: write one like `{example}` (a host name is not accepted here)");
    }
    if let Some(field) = quoted(message, "duplicate field `") {
        return format!("`{field}` is written twice in this mapping; keep one");
    }
    if let Some(field) = quoted(message, "missing field `") {
        return format!("missing key `{field}`; add it (see docs/configuration.md)");
    }
    if let Some(field) = quoted(message, "unknown field `") {
        let valid = message.split_once(", expected ").map(|(_, v)| v.trim_start_matches("one of ").to_string());
        return match valid {
            Some(v) => format!("unknown key `{field}`; valid keys here: {v}"),
            None => format!("unknown key `{field}`; this mapping takes no keys"),
        };
    }
    if let Some(value) = quoted(message, "unknown variant `") {
        let valid = message.split_once(", expected ").map_or(String::new(), |(_, v)| v.trim_start_matches("one of ").to_string());
        return format!("unknown value `{value}`; valid: {valid}");
    }
    for (prefix, out_of_range) in [("invalid type: ", false), ("invalid value: ", true)] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.rsplit_once(", expected ") {
                let wanted = expected_words(expected, out_of_range);
                let name = leaf.map_or(String::from("this value"), |l| format!("`{l}`"));
                return format!("{name} must be {wanted}, not {}", found_words(found));
            }
        }
    }
    message.to_string()
}

/// For a YAML syntax error on `line` of `text`: when that line's value starts with a
/// character YAML reserves (`*` makes an alias, `@` and `` ` `` are reserved), what to write
/// instead. Cron expressions like `*/15 * * * *` are the usual case.
pub fn quote_hint(text: &str, line: usize) -> Option<String> {
    let source = text.lines().nth(line.checked_sub(1)?)?;
    let (key, value) = source.trim_start().trim_start_matches("- ").split_once(':')?;
    let (key, value) = (key.trim(), value.trim());
    let first = value.chars().next()?;
    if !matches!(first, '*' | '@' | '`') {
        return None;
    }
    let why = if first == '*' { "YAML reads a value that starts with `*` as an alias" } else { "YAML reserves a leading `@` and `` ` ``" };
    let what = if key == "schedule" { "a cron expression" } else { "this value" };
    Some(format!("{why}, so {what} must be quoted: write {key}: \"{}\"", value.replace('"', "\\\"")))
}

/// The example for a key that holds a socket address, if `key` is one.
fn address_example(key: &str) -> Option<&'static str> {
    match key {
        "listen" => Some("listen: 0.0.0.0:7441"),
        "metrics" => Some("metrics: 127.0.0.1:9441"),
        _ => None,
    }
}

/// The text between `prefix` (at the start of `message`) and the next backtick.
fn quoted<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split_once('`').map(|(inside, _)| inside)
}

/// What serde expected, in YAML words. `out_of_range`: the value had the right kind but not
/// the right size ("invalid value: integer `99999999999`, expected u32").
fn expected_words(expected: &str, out_of_range: bool) -> String {
    let unsigned = |max: u64| {
        if out_of_range { format!("a whole number from 0 to {max}") } else { "a whole number (0 or more)".to_string() }
    };
    match expected.trim() {
        "u8" => unsigned(u8::MAX.into()),
        "u16" => unsigned(u16::MAX.into()),
        "u32" => unsigned(u32::MAX.into()),
        "u64" | "usize" => unsigned(u64::MAX),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a string" | "string" | "a borrowed string" | "a character" | "char" => "a single value (text, a name or a path)".into(),
        "a sequence" | "sequence" => "a list (one `- ` item per line below the key)".into(),
        "a map" | "map" => "a mapping (keys on their own lines, indented below it)".into(),
        "socket address" => "an IP address and port, like 127.0.0.1:7441".into(),
        other if other.starts_with("struct ") => "a mapping (keys on their own lines, indented below it)".into(),
        other if other.starts_with("enum ") => "one of its listed values".into(),
        other => other.to_string(),
    }
}

/// What serde found (`serde::de::Unexpected`'s wording), in YAML words.
fn found_words(found: &str) -> String {
    let inside = |prefix: &str| found.strip_prefix(prefix).map(|r| r.trim_matches('`').to_string());
    if let Some(n) = inside("integer ").or_else(|| inside("floating point ")) {
        return format!("the number {n}");
    }
    if let Some(b) = inside("boolean ") {
        return format!("`{b}`");
    }
    if let Some(s) = found.strip_prefix("string ") {
        return format!("the text {s}");
    }
    match found {
        "sequence" => "a list".into(),
        "map" => "a mapping".into(),
        "unit value" | "unit" | "Option value" => "nothing (the key has no value)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words that name Rust types, which no message may contain.
    const RUST: &[&str] = &["struct", "u32", "u64", "usize", "i32", "enum", "variant", "field", "sequence", "unit value"];

    fn clean(message: &str) {
        for word in RUST {
            assert!(!message.contains(word), "{word:?} in {message:?}");
        }
    }

    #[test]
    fn type_errors_speak_yaml() {
        let m = plain("invalid type: string \"alpha\", expected struct Origin", Some("origin"));
        assert_eq!(m, "`origin` must be a mapping (keys on their own lines, indented below it), not the text \"alpha\"");
        let m = plain("invalid type: string \"many\", expected u32", Some("retention.origin.last"));
        assert_eq!(m, "`last` must be a whole number (0 or more), not the text \"many\"");
        let m = plain("invalid value: integer `99999999999`, expected u32", Some("retention.origin.last"));
        assert_eq!(m, "`last` must be a whole number from 0 to 4294967295, not the number 99999999999");
        let m = plain("invalid type: map, expected a sequence", Some("replicas"));
        assert!(m.starts_with("`replicas` must be a list") && m.ends_with("not a mapping"), "{m}");
        let m = plain("invalid type: sequence, expected a string", Some("replicas[0].path"));
        assert!(m.starts_with("`path` must be a single value"), "{m}");
        for m in [
            plain("invalid type: integer `-1`, expected u32", Some("retention.origin.last")),
            plain("invalid type: unit value, expected struct TlsFiles", Some("tls")),
            plain("unknown variant `sometimes`, expected one of `snapshot`, `continuous`, `hybrid`", Some("mode")),
            plain("unknown field `colour`, expected one of `node`, `path`, `snapshot_dir`", Some("origin.colour")),
            plain("missing field `path`", Some("origin")),
            plain("duplicate field `mode`", None),
        ] {
            clean(&m);
        }
    }

    #[test]
    fn keys_and_values_are_named_as_such() {
        assert_eq!(plain("unknown field `colour`, expected one of `node`, `path`", None), "unknown key `colour`; valid keys here: `node`, `path`");
        assert_eq!(plain("unknown variant `x`, expected one of `a`, `b`", None), "unknown value `x`; valid: `a`, `b`");
        assert!(plain("missing field `path`", None).starts_with("missing key `path`"));
        assert!(plain("duplicate field `mode`", None).contains("`mode` is written twice"));
    }

    #[test]
    fn addresses_get_an_example() {
        let m = plain("invalid socket address syntax", Some("listen"));
        assert!(m.contains("`listen: 0.0.0.0:7441`"), "{m}");
        assert!(plain("invalid type: sequence, expected socket address", Some("metrics")).contains("metrics: 127.0.0.1:9441"));
    }

    #[test]
    fn values_yaml_reserves_must_be_quoted() {
        let text = "fileset: a\nschedule: */15 * * * *\nother: @x\nfine: 0 3 * * *\n";
        let m = quote_hint(text, 2).unwrap();
        assert!(m.contains("cron expression must be quoted") && m.contains("schedule: \"*/15 * * * *\""), "{m}");
        assert!(quote_hint(text, 3).unwrap().contains("other: \"@x\""));
        assert_eq!(quote_hint(text, 4), None);
        assert_eq!(quote_hint(text, 9), None);
    }
}
