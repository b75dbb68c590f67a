//! The module layering of `src/` (docs/architecture.md, "Layers"), checked from the source.
//!
//! Reads every `src/**/*.rs` file, drops comments and the trailing `#[cfg(test)] mod tests`
//! block (tests may reach across layers to build their fixtures), and collects the
//! `crate::<module>` paths the production code names (in `use` lines and in expressions).
//! Then checks:
//! - no import cycle between top-level modules;
//! - no module imports one of a higher layer;
//! - the issue-15 rules: `audiosocket` knows no call or agent; `records` nothing of `call`;
//!   `ari` no agent or call type; `health` no `fallback` type; `config` only `*Config` types and
//!   validators, and nothing but the application layer imports `config`; `audio` does no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, top (imports anything below) to bottom (imports nothing of the crate).
const LAYERS: &[(&str, u8)] = &[
    ("main", 8),
    ("lib", 8),
    ("app", 8),
    ("selftest", 8),
    ("config", 7),
    ("console", 7),
    ("call", 6),
    ("caller", 6),
    ("agent", 5),
    ("ari", 5),
    ("tools", 5),
    ("guard", 5),
    ("fallback", 5),
    ("profiles", 5),
    ("records", 5),
    ("webhooks", 5),
    ("audio", 3),
    ("audiosocket", 3),
    ("chanws", 3),
    ("rtp", 3),
    ("tunnel", 3),
    ("health", 3),
    ("error", 1),
    ("backoff", 1),
    ("secret", 1),
    ("tls", 1),
    ("wavfile", 3),
];

/// `(importer, imported)` pairs a rule forbids outright, whatever the layers say.
const FORBIDDEN: &[(&str, &str, &str)] = &[
    ("audiosocket", "call", "the wire knows no call"),
    ("audiosocket", "agent", "the wire knows no agent"),
    ("chanws", "call", "the wire knows no call"),
    ("chanws", "agent", "the wire knows no agent"),
    ("rtp", "call", "the wire knows no call"),
    ("rtp", "agent", "the wire knows no agent"),
    ("records", "call", "records stores plain summaries"),
    ("ari", "agent", "ARI knows no agent type"),
    (
        "ari",
        "call",
        "ARI is the protocol; the Stasis controller lives in call/stasis.rs",
    ),
    ("health", "fallback", "health reads the state it is given"),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| {
            panic!("module `{module}` has no layer: add it to LAYERS and docs/architecture.md")
        })
        .1
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's production code: without comments and without a `#[cfg(test)]` item that
/// runs to the end of the file (the usual `mod tests`), or a `#[cfg(test)] mod x;` line.
fn production_code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if t.starts_with("#[cfg(test)]") {
            let next = lines.get(i + 1).map(|l| l.trim_start()).unwrap_or("");
            if next.starts_with("mod ") && next.ends_with(';') {
                i += 2;
                continue;
            }
            if next.starts_with("mod ") && lines[i].starts_with('#') {
                break; // a top-level test module: the rest of the file
            }
        }
        if !t.starts_with("//") {
            // Drop a trailing comment (not inside a string: good enough for `crate::` paths).
            let code = match t.find(" //") {
                Some(k) if !t[..k].contains('"') => &t[..k],
                _ => t,
            };
            out.push_str(code);
            out.push('\n');
        }
        i += 1;
    }
    out
}

/// Every `crate::a::b::C` path (as `a::b::C`, braces flattened one level) in `code`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(k) = rest.find("crate::") {
        let before = rest[..k].chars().last();
        rest = &rest[k + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `voicegate_crate::`
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let head = rest[..end].trim_end_matches(':');
        if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
            let close = rest[end..].find('}').map_or(rest.len(), |c| end + c);
            for item in rest[end + 1..close].split(',') {
                let item = item.split_whitespace().next().unwrap_or("");
                if !item.is_empty() {
                    out.push(format!("{head}::{item}"));
                }
            }
        } else {
            out.push(head.to_owned());
        }
    }
    out
}

struct Source {
    module: String,
    file: PathBuf,
    code: String,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    let tests_only = test_module_files(&files);
    files
        .into_iter()
        .filter(|f| !tests_only.contains(f))
        .map(|file| {
            let rel = file.strip_prefix(&root).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            let code = production_code(&std::fs::read_to_string(&file).unwrap());
            Source { module, file, code }
        })
        .collect()
}

/// The files of modules declared under `#[cfg(test)]` (`mod x;` in `a/mod.rs` → `a/x.rs`,
/// with an optional `#[path = "…"]` relative to the declaring file's directory).
fn test_module_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for (i, l) in lines.iter().enumerate() {
            if *l != "#[cfg(test)]" {
                continue;
            }
            let mut j = i + 1;
            let mut path = None;
            while let Some(attr) = lines.get(j).filter(|l| l.starts_with("#[")) {
                if let Some(p) = attr.strip_prefix("#[path = \"") {
                    path = p.split('"').next().map(str::to_owned);
                }
                j += 1;
            }
            let Some(name) = lines
                .get(j)
                .and_then(|l| l.strip_prefix("mod "))
                .and_then(|l| l.strip_suffix(';'))
            else {
                continue;
            };
            let dir = f.parent().unwrap();
            out.insert(match path {
                Some(p) => dir.join(p),
                None if f.ends_with("mod.rs") || f.ends_with("lib.rs") => {
                    dir.join(format!("{name}.rs"))
                }
                None => dir.join(f.file_stem().unwrap()).join(format!("{name}.rs")),
            });
        }
    }
    out
}

/// Every violation, as one line each.
fn violations() -> Vec<String> {
    let mut out = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sources() {
        let from = &s.module;
        let file = s.file.file_name().unwrap().to_string_lossy().into_owned();
        let file = format!("{from}/{file}");
        for path in crate_paths(&s.code) {
            let to = path.split("::").next().unwrap().to_owned();
            if &to == from || to.is_empty() {
                continue;
            }
            edges.entry(from.clone()).or_default().insert(to.clone());
            if layer(&to) > layer(from) {
                out.push(format!(
                    "{file}: `{from}` (layer {}) imports higher `crate::{path}` (layer {})",
                    layer(from),
                    layer(&to)
                ));
            }
            for (a, b, why) in FORBIDDEN {
                if from == a && &to == b {
                    out.push(format!("{file}: `{from}` imports `crate::{path}`: {why}"));
                }
            }
            if to == "config" && layer(from) < layer("app") {
                out.push(format!(
                    "{file}: `{from}` imports `crate::{path}`: no module imports config.rs"
                ));
            }
            if from == "config" {
                let last = path.rsplit("::").next().unwrap();
                let ok = path.contains("::config::")
                    || last.ends_with("Config")
                    || last == "ConfigError"
                    || last == "validate_config";
                if !ok {
                    out.push(format!(
                        "{file}: config.rs imports `crate::{path}`, not a *Config type"
                    ));
                }
            }
        }
        if s.module == "audio" {
            // (tokio's `Instant` is a value type, not I/O: sans-IO code takes `now` in it.)
            let io_paths = [
                "std::fs",
                "std::net",
                "tokio::net",
                "tokio::fs",
                "tokio::io",
                "tokio::spawn",
                "tokio::time::sleep",
                "File::",
            ];
            for io in io_paths {
                if s.code.contains(io) {
                    out.push(format!("{file}: `audio` does I/O (`{io}`)"));
                }
            }
        }
    }
    for cycle in cycles(&edges) {
        out.push(format!("import cycle: {}", cycle.join(" → ")));
    }
    out
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Violations still being removed (issue 15), by the start of their line. Every entry must
/// still match one (so the list only shrinks); nothing else may violate.
const KNOWN: &[&str] = &[];

#[test]
fn src_modules_follow_the_layers() {
    let v = violations();
    let new: Vec<_> = v
        .iter()
        .filter(|l| !KNOWN.iter().any(|k| l.starts_with(k)))
        .collect();
    assert!(
        new.is_empty(),
        "{} layering violations:\n{new:#?}",
        new.len()
    );
    let gone: Vec<_> = KNOWN
        .iter()
        .filter(|k| !v.iter().any(|l| l.starts_with(*k)))
        .collect();
    assert!(gone.is_empty(), "fixed, remove from KNOWN: {gone:?}");
}

/// The checker itself: a planted upward import, a cycle and a forbidden pair are found;
/// comments and test modules are not read.
#[test]
fn the_checker_finds_what_it_should() {
    let code = production_code(
        "use crate::call::CallSummary; // crate::agent in a comment\n\
         /// [`crate::service`]\n\
         let x = crate::ari::{client::Client, model::Event};\n\
         #[cfg(test)]\nmod tests {\n use crate::service::run;\n}\n",
    );
    assert_eq!(
        crate_paths(&code),
        [
            "call::CallSummary",
            "ari::client::Client",
            "ari::model::Event"
        ]
    );
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    edges.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycles(&edges), [["a", "b", "c"]]);
    assert!(layer("audio") < layer("call") && layer("call") < layer("config"));
}
