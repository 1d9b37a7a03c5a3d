//! The shape of the source tree, checked: no file over the size a reader takes in at once, and
//! no import cycle between the library's modules (arrows point down: a module may use its
//! children and its siblings' children, never anything that uses it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The most lines a source file may have (tests included).
const MAX_LINES: usize = 500;

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_source_or_test_file_is_over_500_lines() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("tests"), &mut files);
    rust_files(&root().join("examples"), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:?}");
}

/// The library's module path of a file under src/ (`src/worker/mod.rs` → `worker`).
fn module_of(relative: &Path) -> String {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The longest known module that `path` (a `::` path from the crate root) names or is inside.
fn resolve(path: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|len| path[..len].join("::"))
        .find(|candidate| modules.contains(candidate))
}

/// Module → the modules its code (not its tests) refers to.
fn library_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // The binary is checked by the compiler's own rules; test modules may reach anywhere.
    files.retain(|file| !file.starts_with(src.join("bin")) && !file.ends_with("tests.rs"));
    let sources: BTreeMap<String, String> = files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            // Tests may reach anywhere.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default().to_owned();
            (module_of(file.strip_prefix(&src).unwrap()), code)
        })
        .collect();
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    let mut imports = BTreeMap::new();
    for (module, code) in &sources {
        let own: Vec<&str> = module.split("::").filter(|part| !part.is_empty()).collect();
        let mut uses = BTreeSet::new();
        for (at, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
            let rest = &code[at..];
            let path: Vec<&str> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or_default()
                .split("::")
                .filter(|part| !part.is_empty())
                .collect();
            let absolute: Vec<&str> = if path.first() == Some(&"super") {
                let parent = &own[..own.len().saturating_sub(1)];
                parent.iter().copied().chain(path[1..].iter().copied()).collect()
            } else {
                path[1..].to_vec()
            };
            if let Some(target) = resolve(&absolute, &modules)
                && &target != module
                && !target.is_empty()
            {
                uses.insert(target);
            }
        }
        // A parent uses its children.
        let prefix = format!("{module}::");
        let children = modules.iter().filter(|other| {
            !module.is_empty()
                && other
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains("::"))
        });
        uses.extend(children.cloned());
        imports.insert(module.clone(), uses);
    }
    imports
}

#[test]
fn the_library_has_no_import_cycles() {
    let imports = library_imports();
    // Depth-first search for a path back to where it started (the crate root, a facade that
    // re-exports everything, is left out).
    fn reaches(
        from: &str,
        target: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> bool {
        for next in imports.get(from).into_iter().flatten() {
            if next == target {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if reaches(next, target, imports, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    for module in imports.keys().filter(|module| !module.is_empty()) {
        let mut path = vec![module.clone()];
        if reaches(module, module, &imports, &mut BTreeSet::new(), &mut path) {
            panic!("import cycle: {}", path.join(" -> "));
        }
    }
    // The check sees the arrows it should.
    assert!(
        imports["worker::passes"].contains("worker::handler"),
        "{imports:#?}"
    );
    assert!(imports["worker"].contains("worker::loops"), "{imports:#?}");
}
