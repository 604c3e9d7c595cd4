//! The committed header is exactly what the pinned cbindgen generates, and it
//! compiles on its own as C11 and C++17 with every warning an error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn committed_header_matches_cbindgen() {
    let fresh = tmp("flatshard.h");
    let o = Command::new(repo().join("scripts/gen-header.sh")).arg(&fresh).output().expect("run scripts/gen-header.sh");
    assert!(o.status.success(), "scripts/gen-header.sh failed:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let committed = repo().join("include/flatshard.h");
    if std::fs::read(&committed).unwrap() != std::fs::read(&fresh).unwrap() {
        let diff =
            Command::new("diff").arg("-u").arg(&committed).arg(&fresh).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        panic!("include/flatshard.h is stale: run scripts/gen-header.sh and commit the result.\n{diff}");
    }
}

/// A translation unit that includes only the header and touches its types.
const USE_HEADER: &str = r#"
#include "flatshard.h"
int use_header(flatshard_comm_options *o, const flatshard_collectives *ops);
int use_header(flatshard_comm_options *o, const flatshard_collectives *ops) {
  const char *(*name)(flatshard_status) = flatshard_status_name;
  flatshard_dtype d = FLATSHARD_BF16;
  flatshard_reduce_op r = FLATSHARD_AVG;
  o->transport = FLATSHARD_TRANSPORT_TCP;
  return (int)d + (int)r + (int)o->transport + FLATSHARD_VERSION_MAJOR + (ops->ctx != NULL)
       + (name(FLATSHARD_OK) != NULL);
}
"#;

fn compile(compiler: &str, args: &[&str], ext: &str) {
    let src = tmp(&format!("use_header.{ext}"));
    std::fs::write(&src, USE_HEADER).unwrap();
    let o = Command::new(compiler)
        .args(args)
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-I"])
        .arg(repo().join("include"))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(o.status.success(), "{compiler} {args:?} rejects include/flatshard.h:\n{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn header_compiles_as_c11() {
    compile("gcc", &["-std=c11", "-x", "c"], "c");
}

#[test]
fn header_compiles_as_cpp17() {
    compile("g++", &["-std=c++17", "-x", "c++"], "cpp");
}

/// Every name the header declares is flatshard's (prefix flatshard_ /
/// FLATSHARD_), so it can be included next to nccl.h, cuda.h or torch's
/// headers: no stray typedef, macro or enum constant of a dependency.
#[test]
fn header_declares_only_flatshard_names() {
    let text = std::fs::read_to_string(repo().join("include/flatshard.h")).unwrap();
    // drop comments
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("/*") {
        code.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    code.push_str(rest);
    let ok = |n: &str| n.starts_with("flatshard_") || n.starts_with("FLATSHARD_") || n == "FLATSHARD_H";
    let mut bad = Vec::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for line in code.lines().map(str::trim) {
        let name = if let Some(r) = line.strip_prefix("#define ") {
            ident(r)
        } else if let Some(r) = line.strip_prefix("} ") {
            ident(r) // end of typedef struct/enum
        } else if line.starts_with("typedef ") && line.ends_with(';') && !line.contains('(') {
            ident(line.trim_end_matches(';').rsplit([' ', '*']).next().unwrap_or(""))
        } else if line.contains('(')
            && !line.ends_with(',')
            && !line.starts_with('#')
            && !line.starts_with("typedef")
            && line.split('(').next().is_some_and(|h| h.contains(' '))
        {
            ident(line.split('(').next().unwrap().rsplit([' ', '*']).next().unwrap_or(""))
        } else if line.ends_with(',') || line.contains(" = ") {
            // enum constants
            let n = ident(line);
            if n.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                n
            } else {
                continue;
            }
        } else {
            continue;
        };
        if !name.is_empty()
            && !ok(&name)
            && !["extern", "const", "void", "int", "uint32_t", "int32_t", "uint64_t", "uint16_t", "size_t", "char"].contains(&name.as_str())
        {
            bad.push(name);
        }
    }
    assert!(bad.is_empty(), "include/flatshard.h declares names outside flatshard's prefix: {bad:?}");
}

/// The functions `include/flatshard.h` declares, each with the text of the
/// doc comment right above its declaration (None if there is none).
fn declared_functions(header: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut comment: Option<String> = None; // the last comment, if it ended on the previous line
    let mut in_comment = false;
    let mut current = String::new();
    for line in header.lines() {
        if in_comment {
            current.push_str(line);
            current.push('\n');
            if line.contains("*/") {
                in_comment = false;
                comment = Some(std::mem::take(&mut current));
            }
            continue;
        }
        if line.trim_start().starts_with("/*") {
            current = format!("{line}\n");
            if line.contains("*/") {
                comment = Some(std::mem::take(&mut current));
            } else {
                in_comment = true;
            }
            continue;
        }
        // A declaration starts in column 0 (struct fields and parameters are
        // indented): `<type> [*]flatshard_name(`.
        let is_decl = !line.starts_with([' ', '#', '}', '\t'])
            && !line.starts_with("typedef")
            && !line.starts_with("extern")
            && line.split('(').next().is_some_and(|head| head.contains(' ') && head.rsplit([' ', '*']).next().is_some_and(|n| n.starts_with("flatshard_")));
        if is_decl {
            let head = line.split('(').next().unwrap_or("");
            let name = head.rsplit([' ', '*']).next().unwrap_or("").to_string();
            out.push((name, comment.take()));
        } else {
            comment = None;
        }
    }
    out
}

/// The names of the `#[no_mangle] extern "C" fn`s in src/ffi.
fn exported_functions() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("src/ffi")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("extern \"C\" fn flatshard_") {
                let rest = &text[i + "extern \"C\" fn ".len()..];
                names.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
    }
    names.sort();
    names
}

/// Every function the header declares says, in its doc comment, who owns
/// what (`Ownership:`), the thread-safety rule (`Threads:`), and every
/// status it returns (`Statuses:`) or, for functions that return something
/// else, what (`Returns:`), each label at the start of a comment line.
#[test]
fn every_function_documents_ownership_threads_and_statuses() {
    let text = std::fs::read_to_string(repo().join("include/flatshard.h")).unwrap();
    let decls = declared_functions(&text);
    let mut declared: Vec<String> = decls.iter().map(|(n, _)| n.clone()).collect();
    declared.sort();
    // The parser sees exactly the exports, so the check below covers them all.
    assert_eq!(declared, exported_functions(), "the functions found in include/flatshard.h differ from the exports in src/ffi");
    let mut missing = Vec::new();
    for (name, doc) in &decls {
        let Some(doc) = doc else {
            missing.push(format!("{name}: no doc comment"));
            continue;
        };
        let starts = |label: &str| doc.lines().any(|l| l.trim_start().trim_start_matches(['/', '*']).trim_start().starts_with(label));
        let lacks: Vec<&str> =
            [("Ownership:", starts("Ownership:")), ("Threads:", starts("Threads:")), ("Statuses: or Returns:", starts("Statuses:") || starts("Returns:"))]
                .iter()
                .filter(|(_, has)| !has)
                .map(|(l, _)| *l)
                .collect();
        if !lacks.is_empty() {
            missing.push(format!("{name}: no {}", lacks.join(", ")));
        }
    }
    assert!(missing.is_empty(), "exported functions whose doc comment lacks a label (see API.md §1):\n{}", missing.join("\n"));
}
