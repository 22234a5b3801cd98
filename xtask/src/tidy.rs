//! Tidy checks, run as this crate's tests (so `cargo xtask test` and CI run
//! them): the code map stays true as the code moves.
//!
//! - Every source file opens with `//!` docs, and every library's (and
//!   binary's) crate docs have a `# Layout` section naming each of its
//!   modules.
//! - The dependency diagram in `docs/ARCHITECTURE.md` lists, for every
//!   crate, exactly the workspace crates its `Cargo.toml` depends on
//!   (normal dependencies; dev-dependencies are the tests' business).
//! - The number of non-test functions longer than [`LONG_FUNCTION_LINES`]
//!   may only go down ([`MAX_LONG_FUNCTIONS`], a ratchet: lower it when
//!   the count drops).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A function longer than this many lines (signature to closing brace)
/// counts as long.
const LONG_FUNCTION_LINES: usize = 70;

/// How many non-test functions may be long. Only ever lower this.
const MAX_LONG_FUNCTIONS: usize = 44;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

/// The `.rs` files under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The source trees checked: every crate's `src/`, the benches' and
/// xtask's.
fn source_dirs() -> Vec<PathBuf> {
    let root = root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
        .map(|e| e.path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.push(root.join("benches/src"));
    dirs.push(root.join("xtask/src"));
    dirs.sort();
    dirs
}

#[test]
fn every_source_file_opens_with_module_docs() {
    let mut missing = Vec::new();
    for dir in source_dirs() {
        for file in rust_files(&dir) {
            let text = std::fs::read_to_string(&file).expect("readable source");
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with("#!["))
                .unwrap_or("");
            if !first.starts_with("//!") {
                missing.push(
                    file.strip_prefix(root())
                        .unwrap_or(&file)
                        .display()
                        .to_string(),
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "these files do not open with `//!` docs saying what they hold:\n{}",
        missing.join("\n")
    );
}

/// The modules a crate root declares (`mod x;`, `pub mod x;`).
fn declared_modules(root_file: &str) -> Vec<String> {
    root_file
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            rest.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

#[test]
fn crate_docs_name_every_module_in_their_layout() {
    let mut wrong = Vec::new();
    for dir in source_dirs() {
        for name in ["lib.rs", "main.rs"] {
            let file = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let modules = declared_modules(&text);
            if modules.is_empty() {
                continue;
            }
            let docs: String = text
                .lines()
                .filter(|l| l.starts_with("//!"))
                .collect::<Vec<_>>()
                .join("\n");
            let Some((_, layout)) = docs.split_once("# Layout") else {
                wrong.push(format!("{}: no `# Layout` section", file.display()));
                continue;
            };
            for m in modules {
                if !layout.contains(&format!("`{m}`")) && !layout.contains(&format!("[`{m}`]")) {
                    wrong.push(format!(
                        "{}: module `{m}` is not named in its `# Layout`",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The workspace crates `manifest` depends on (normal dependencies), by
/// their directory name (`tern-raft-net` is `raft-net`).
fn workspace_deps(manifest: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps && let Some(name) = line.strip_prefix("tern-") {
            let name = name.split(['.', ' ', '=']).next().unwrap_or("");
            deps.insert(name.to_owned());
        }
    }
    deps
}

/// The diagram's lines: crate → the crates it says it uses.
fn diagram(architecture: &str) -> BTreeMap<String, BTreeSet<String>> {
    let block = architecture
        .split_once("## Dependency direction")
        .and_then(|(_, rest)| rest.split_once("```"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("docs/ARCHITECTURE.md has a dependency diagram in a code block");
    let mut out = BTreeMap::new();
    for line in block.lines() {
        let Some((name, rest)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        let Some(uses) = rest.trim().strip_prefix("uses ") else {
            continue;
        };
        let uses = uses.split('(').next().unwrap_or("");
        let used: BTreeSet<String> = if uses.trim().starts_with("nothing") {
            BTreeSet::new()
        } else {
            uses.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        out.insert(name.to_owned(), used);
    }
    out
}

#[test]
fn the_dependency_diagram_matches_the_manifests() {
    let root = root();
    let architecture =
        std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let drawn = diagram(&architecture);
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(manifest) = std::fs::read_to_string(entry.path().join("Cargo.toml")) else {
            continue;
        };
        let actual = workspace_deps(&manifest);
        match drawn.get(&name) {
            None => wrong.push(format!("crate {name} is missing from the diagram")),
            Some(said) if name == "lab" || name == "node" => {
                // Drawn as "the crates it composes": every dependency must
                // be a crate of the diagram.
                for d in actual.iter().filter(|d| !drawn.contains_key(*d)) {
                    wrong.push(format!(
                        "{name} depends on {d}, which is not in the diagram"
                    ));
                }
                let _ = said;
            }
            Some(said) if *said != actual => wrong.push(format!(
                "{name}: the diagram says it uses {said:?}, its Cargo.toml {actual:?}"
            )),
            Some(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/ARCHITECTURE.md's dependency diagram is out of date:\n{}",
        wrong.join("\n")
    );
}

/// Non-test functions of `text` longer than [`LONG_FUNCTION_LINES`]:
/// a function runs from its `fn` line to the first line that is its
/// indentation followed by `}`. Code after `#[cfg(test)]` is skipped.
fn long_functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "#[cfg(test)]" {
            break;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let sig = trimmed
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub ")
            .trim_start_matches("const ")
            .trim_start_matches("async ");
        let Some(rest) = sig.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            let len = end + 2;
            if len > LONG_FUNCTION_LINES {
                out.push((name, len));
            }
        }
    }
    out
}

#[test]
fn long_functions_only_get_fewer() {
    let mut long = Vec::new();
    for dir in source_dirs() {
        for file in rust_files(&dir) {
            let text = std::fs::read_to_string(&file).expect("readable source");
            for (name, len) in long_functions(&text) {
                let shown = file
                    .strip_prefix(root())
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                long.push(format!("{shown}: {name} ({len} lines)"));
            }
        }
    }
    assert!(
        long.len() <= MAX_LONG_FUNCTIONS,
        "{} functions are longer than {LONG_FUNCTION_LINES} lines, more than the {MAX_LONG_FUNCTIONS} \
         allowed: split the new ones.\n{}",
        long.len(),
        long.join("\n")
    );
    if long.len() < MAX_LONG_FUNCTIONS {
        println!(
            "tidy: {} long functions; lower MAX_LONG_FUNCTIONS in xtask/src/tidy.rs to {} to keep it so",
            long.len(),
            long.len()
        );
    }
}

#[test]
fn the_function_counter_sees_a_long_function() {
    let body = "    x();\n".repeat(LONG_FUNCTION_LINES);
    let text = format!("fn short() {{\n}}\n\npub async fn long() {{\n{body}}}\n");
    assert_eq!(
        long_functions(&text),
        vec![("long".to_owned(), LONG_FUNCTION_LINES + 2)]
    );
}
