//! The C++ example (include/flatshard.hpp) compiled with g++ -std=c++17
//! against the built library and run on 2 ranks through flatshard-run.
use std::path::Path;
use std::process::Command;

#[test]
fn cpp_example_runs_on_two_ranks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let lib = target.join("debug");
    let exe = std::env::temp_dir().join(format!("flatshard-cpp-example-{}", std::process::id()));
    let out = Command::new("g++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(format!("-I{}", root.join("include").display()))
        .arg(root.join("examples-c/cpp_example.cpp"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg("-lflatshard")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "g++ failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(env!("CARGO_BIN_EXE_flatshard-run")).args(["-n", "2", "--"]).arg(&exe).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let _ = std::fs::remove_file(&exe);
    assert!(run.status.success(), "{text}");
    assert!(text.contains("C++ example OK: 2 ranks"), "{text}");
}
