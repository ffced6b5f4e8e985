//! The dependency rule of ARCHITECTURE.md, checked: each top-level module of `src/` may use
//! only the modules listed for it here (those below it), so there is no import cycle and the
//! transport never reaches into retention or scheduling. A new edge is a design decision:
//! change ARCHITECTURE.md and this table together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Who may use whom, lowest layer first.
const ALLOWED: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("snapshot", &["config"]),
    ("store", &["config", "snapshot"]),
    ("schedule", &["config", "snapshot"]),
    ("ship", &["config", "snapshot", "store"]),
    ("observe", &["config", "snapshot", "ship"]),
    ("replicate", &["config", "snapshot", "schedule", "ship"]),
    ("restore", &["config", "snapshot"]),
    ("objstore", &["config", "snapshot", "schedule", "ship", "restore"]),
    ("replica", &["config", "snapshot", "store", "schedule", "ship", "observe", "replicate"]),
    ("origin", &["config", "snapshot", "store", "schedule", "ship", "observe", "replicate"]),
    ("node", &["config", "snapshot", "store", "schedule", "ship", "observe", "replicate", "objstore", "replica", "origin"]),
    ("cli", &["config", "snapshot", "store", "schedule", "ship", "observe", "replicate", "restore", "objstore", "replica", "origin", "node"]),
    // Unit tests of the roles with fake backends (cfg(test) only).
    ("role_tests", &["config", "snapshot", "store", "schedule", "ship", "observe", "replicate", "restore", "objstore", "replica", "origin", "node", "cli"]),
];

/// The top-level module a file under `src/` belongs to (`None` for the crate root).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Every `crate::NAME` a file uses, outside comments.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            // `$crate::` (in macros) names the crate itself, not a module edge.
            let before = &rest[..i];
            rest = &rest[i + "crate::".len()..];
            if before.ends_with('$') {
                continue;
            }
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        if module == "role_tests" {
            continue; // tests may use anything
        }
        let Some(may) = allowed.get(module.as_str()) else {
            broken.push(format!("{}: module `{module}` is not in the layer table of tests/it/layers.rs", file.display()));
            continue;
        };
        for used in uses(&std::fs::read_to_string(file).unwrap()) {
            if used != module && !may.contains(&used.as_str()) {
                broken.push(format!("{}: `{module}` uses `crate::{used}`, which is not below it", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "the dependency rule (ARCHITECTURE.md) is broken:\n{}", broken.join("\n"));
}

#[test]
fn the_table_is_a_strict_order() {
    // Each module may use only modules listed before it: no cycle can pass the check above.
    for (i, (module, may)) in ALLOWED.iter().enumerate() {
        for m in *may {
            let j = ALLOWED.iter().position(|(n, _)| n == m).unwrap_or_else(|| panic!("`{module}` lists unknown `{m}`"));
            assert!(j < i, "`{module}` may use `{m}`, which is not below it");
        }
    }
}
