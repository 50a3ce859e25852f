//! The shape of the code, checked: the rules of `STYLE.md` that a reader can break without a
//! compiler noticing. Each test reads the workspace's sources as text.
//!
//! - Storage is a seam: only storage modules (a `store` module of its crate) and start-up match
//!   on the backend or touch a pool, a connection or a driver.
//! - No source file holds more than [`MAX_LINES`] lines before its tests.
//! - The HTTP layer sits on top: outside `src/http/`, only the composition root refers to it.
//! - No code is kept alive only for the OpenAPI document (`allow(dead_code)`).

use std::path::{Path, PathBuf};

/// Lines of code a source file may hold before its `#[cfg(test)]` module.
const MAX_LINES: usize = 800;

/// The crates' source folders, relative to the workspace root.
const SOURCES: [&str; 4] = ["src", "domain/src", "projections/src", "workers/src"];

/// Every folder with Rust code: sources, tests and benches.
const ALL: [&str; 9] = [
    "src",
    "domain/src",
    "projections/src",
    "workers/src",
    "tests",
    "domain/tests",
    "projections/tests",
    "benches",
    "domain/benches",
];

/// Files that may match on the backend besides storage modules: the composition root and the
/// test database support that opens either backend.
const BACKEND_ALLOWED: [&str; 2] = ["src/startup.rs", "domain/src/testing.rs"];

/// Tests and benchmarks of the storage code itself.
const STORAGE_TESTS: [&str; 4] = [
    "domain/tests/suite/store.rs",
    "domain/tests/suite/keys.rs",
    "domain/tests/suite/ordering.rs",
    "domain/benches/store.rs",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file below the folders, as `(path relative to the root, text)`.
fn files(folders: &[&str]) -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = root();
    let mut paths = Vec::new();
    for folder in folders {
        walk(&root.join(folder), &mut paths);
    }
    let mut files: Vec<(String, String)> = paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let relative = path.strip_prefix(&root).unwrap().to_string_lossy();
            (relative.replace('\\', "/"), text)
        })
        .collect();
    files.sort();
    files
}

/// A storage module: a `store` module (file or folder) of its crate.
fn is_storage(path: &str) -> bool {
    path.split('/')
        .any(|part| part == "store" || part == "store.rs")
}

/// The text before the file's `#[cfg(test)]` module.
fn before_tests(text: &str) -> &str {
    text.find("\n#[cfg(test)]").map_or(text, |at| &text[..at])
}

/// The text without its comment lines (docs may name what code may not use).
fn code(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files among `files` whose text (before its tests, with `code_only`) `breaks`, except
/// those `allowed`.
fn offenders(
    files: &[(String, String)],
    code_only: bool,
    allowed: impl Fn(&str) -> bool,
    breaks: impl Fn(&str) -> bool,
) -> Vec<String> {
    files
        .iter()
        .filter(|(path, _)| !allowed(path))
        .filter(|(_, text)| breaks(&code(if code_only { before_tests(text) } else { text })))
        .map(|(path, _)| path.clone())
        .collect()
}

/// Fails listing the files that break the rule.
fn check(rule: &str, found: Vec<String>) {
    assert!(found.is_empty(), "{rule}\n  breaking it: {found:?}");
}

#[test]
fn only_storage_modules_and_start_up_match_on_the_backend() {
    let found = offenders(
        &files(&ALL),
        false,
        |path| {
            is_storage(path)
                || BACKEND_ALLOWED.contains(&path)
                || STORAGE_TESTS.contains(&path)
                || path.ends_with("architecture.rs")
        },
        |text| text.contains("Backend::Postgres") || text.contains("Backend::Sqlite"),
    );
    check(
        "only storage modules and start-up match on the backend",
        found,
    );
}

#[test]
fn only_storage_modules_hold_pools_connections_or_drivers() {
    let found = offenders(
        &files(&SOURCES),
        true,
        |path| is_storage(path) || BACKEND_ALLOWED.contains(&path),
        |text| {
            [
                "tokio_postgres::",
                "deadpool_postgres::",
                "rusqlite::",
                "deadpool_sqlite::",
                ".pool()",
            ]
            .iter()
            .any(|raw| text.contains(raw))
        },
    );
    check(
        "only storage modules hold pools, connections or drivers",
        found,
    );
}

#[test]
fn no_source_file_holds_more_than_800_lines_before_its_tests() {
    let found = files(&SOURCES)
        .into_iter()
        .filter(|(_, text)| before_tests(text).lines().count() > MAX_LINES)
        .map(|(path, _)| path)
        .collect();
    check(
        "no source file holds more than 800 lines before its tests",
        found,
    );
}

#[test]
fn outside_the_http_layer_only_the_composition_root_refers_to_it() {
    let found = offenders(
        &files(&["src"]),
        false,
        |path| path.starts_with("src/http/") || path == "src/startup.rs",
        |text| text.contains("crate::http"),
    );
    check(
        "outside src/http/ only the composition root refers to crate::http",
        found,
    );
}

#[test]
fn no_code_is_kept_only_for_the_openapi_document() {
    let found = offenders(
        &files(&SOURCES),
        true,
        |_| false,
        |text| text.contains("allow(dead_code)"),
    );
    check("no code is kept alive with allow(dead_code)", found);
}
