//! The module graph has no cycles (ARCHITECTURE.md): neither between the
//! top-level modules (`comm`, `mem`, `flat_param`, ...) nor between the files
//! inside them (`ffi::comm` and `ffi::cuda`, `averaging::average` and
//! `averaging::device`, ...). A file depends on another when it names it as
//! `crate::a::b` or `super::x` outside its unit tests. An edge between a module
//! and one of its own submodules is not counted (a parent re-exports its
//! children).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().unwrap() != "bin" {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(&src).unwrap().with_extension("");
            let mut m: Module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if matches!(m.last().map(String::as_str), Some("mod" | "lib")) {
                m.pop();
            }
            let text = std::fs::read_to_string(&f).unwrap();
            // Unit tests may reach anywhere: cut them off.
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap().to_string();
            let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            (m, code)
        })
        .collect()
}

/// The longest known module that `path` (module names) starts with.
fn resolve(mods: &BTreeMap<Module, String>, path: &[String]) -> Option<Module> {
    (1..=path.len()).rev().map(|k| path[..k].to_vec()).find(|p| mods.contains_key(p))
}

fn edges(mods: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect::<String>();
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, code) in mods {
        let deps = g.entry(m.clone()).or_default();
        for (prefix, base) in [("crate::", Vec::new()), ("super::", m[..m.len().saturating_sub(1)].to_vec())] {
            for (i, _) in code.match_indices(prefix) {
                if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let rest = ident(&code[i + prefix.len()..]);
                let mut path = base.clone();
                path.extend(rest.split("::").filter(|s| !s.is_empty()).map(str::to_string));
                if let Some(d) = resolve(mods, &path) {
                    if d != *m {
                        deps.insert(d);
                    }
                }
            }
        }
    }
    g
}

/// Cycles of the graph with every module cut to `depth` names; edges between
/// a module and its own ancestors or descendants are left out.
fn cycles(depth: usize) -> Vec<Vec<String>> {
    let mods = modules();
    let cut = |m: &Module| m[..m.len().min(depth)].to_vec();
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (a, ds) in edges(&mods) {
        for b in ds {
            let (a, b) = (cut(&a), cut(&b));
            let nested = a.starts_with(&b) || b.starts_with(&a);
            if !nested {
                g.entry(a.clone()).or_default().insert(b);
            }
        }
    }
    // Reachability closure is enough at this size (tens of modules).
    let nodes: Vec<Module> = g.keys().chain(g.values().flatten()).cloned().collect::<BTreeSet<_>>().into_iter().collect();
    let reach = |from: &Module| -> BTreeSet<Module> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for d in g.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    };
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    for n in &nodes {
        if done.contains(n) || !reach(n).contains(n) {
            continue;
        }
        let comp: Vec<Module> = nodes.iter().filter(|o| reach(n).contains(*o) && reach(o).contains(n)).cloned().collect();
        done.extend(comp.iter().cloned());
        out.push(comp.iter().map(|m| m.join("::")).collect());
    }
    out
}

#[test]
fn top_level_modules_have_no_cycles() {
    assert_eq!(cycles(1), Vec::<Vec<String>>::new());
}

#[test]
fn files_have_no_cycles() {
    assert_eq!(cycles(9), Vec::<Vec<String>>::new());
}

/// The checker sees what it must: the known layering edges are there.
#[test]
fn the_graph_has_the_expected_edges() {
    let mods = modules();
    let g = edges(&mods);
    let has = |a: &str, b: &str| {
        let (a, b): (Module, Module) = (a.split("::").map(str::to_string).collect(), b.split("::").map(str::to_string).collect());
        g.get(&a).is_some_and(|d| d.contains(&b))
    };
    assert!(has("ffi::comm", "mem"), "ffi::comm should use mem");
    assert!(has("mem", "comm::handle") || has("mem", "comm"), "mem should use comm");
    assert!(has("flat_param", "agree"));
    assert!(has("comm::rendezvous", "config"));
    assert!(has("averaging::device", "averaging::average"));
}
