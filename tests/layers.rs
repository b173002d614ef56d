//! The source tree is the architecture (ARCHITECTURE.md): these checks read `src/` and fail
//! when a lower layer names an upper one or when modules import each other in a circle, so
//! the folders cannot drift from the diagram unnoticed.
//!
//! Layers, top to bottom: `api/` (the only place that knows gRPC), `supervisor/`, the
//! `plugin/` side, then the `logs/` pipeline and the `store/`s (peers). `config/` and `model.rs` sit
//! beside them. A module's `#[cfg(test)] mod tests` is not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every library source file under `src/` (not the binaries), by module path
/// (`plugin::isolation::users`), with its text before any `#[cfg(test)] mod tests`.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().with_extension("");
        let rel = rel.to_str().unwrap();
        if rel.starts_with("bin/") || rel == "main" || rel == "lib" {
            continue;
        }
        let name = rel.trim_end_matches("/mod").replace('/', "::");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        modules.insert(name, text);
    }
    modules
}

/// The modules `text` names through `crate::`, each resolved to the longest known module.
fn imports(text: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        if let Some(module) = (1..=parts.len())
            .rev()
            .map(|k| parts[..k].join("::"))
            .find(|m| known.contains_key(m))
        {
            found.insert(module);
        }
    }
    found
}

fn layer(module: &str) -> &str {
    module.split("::").next().unwrap()
}

#[test]
fn lower_layers_never_name_upper_ones_nor_grpc() {
    let modules = modules();
    assert!(
        modules.contains_key("supervisor::actor") && modules.contains_key("plugin::process"),
        "the walk found the tree: {:?}",
        modules.keys().collect::<Vec<_>>()
    );
    let above: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("supervisor", &["api"][..]),
        ("plugin", &["api", "supervisor"][..]),
        // The log pipeline and the stores are peers: the event log is kept in a `SeqLog`,
        // and a log's index is written with the stores' atomic write.
        ("logs", &["api", "supervisor", "plugin"][..]),
        ("store", &["api", "supervisor", "plugin"][..]),
        (
            "model",
            &["api", "supervisor", "plugin", "logs", "store"][..],
        ),
    ]);
    let mut broken = Vec::new();
    for (module, text) in &modules {
        let Some(forbidden) = above.get(layer(module)) else {
            continue;
        };
        for import in imports(text, &modules) {
            if forbidden.contains(&layer(&import)) {
                broken.push(format!("{module} names {import}"));
            }
        }
        for grpc in ["tonic::", "prost::", "torud_api::pb"] {
            if text.contains(grpc) {
                broken.push(format!("{module} uses {grpc} (only api/ knows gRPC)"));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn modules_do_not_import_each_other_in_a_circle() {
    let modules = modules();
    let edges: BTreeMap<&String, BTreeSet<String>> = modules
        .iter()
        .map(|(m, text)| {
            let mut to = imports(text, &modules);
            to.remove(m);
            (m, to)
        })
        .collect();
    let mut circles = Vec::new();
    for start in edges.keys() {
        // Depth-first from `start`, remembering the path, until it comes back.
        let mut stack = vec![(start.to_string(), vec![start.to_string()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == *start {
                    circles.push(format!("{} -> {start}", path.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules importing each other in a circle:\n{}",
        circles.join("\n")
    );
}
