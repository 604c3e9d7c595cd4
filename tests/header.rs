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
        let diff = Command::new("diff").arg("-u").arg(&committed).arg(&fresh).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
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
