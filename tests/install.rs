//! `make install` into a temporary prefix, then build a C program with
//! pkg-config and a C++17 program with CMake's find_package(flatshard), each
//! linked against the shared and the static library, and run them.
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flatshard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn install_then_build_with_pkg_config_and_cmake() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prefix = tmpdir("prefix");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| root.join("target").display().to_string());
    run(Command::new("make").current_dir(root).args(["install", "PROFILE=debug", &format!("PREFIX={}", prefix.display()), &format!("TARGET_DIR={target}")]));
    let lib = prefix.join("lib");
    assert!(lib.join("libflatshard.so.0").exists(), "soname link missing");
    assert!(prefix.join("include/flatshard_mpi.h").exists(), "flatshard_mpi.h not installed");
    let frun = prefix.join("bin/flatshard-run");
    assert!(run(Command::new(&frun).args(["-n", "2", "--", "sh", "-c", "echo r$RANK"])).contains("[rank 1] r1"), "installed flatshard-run");
    // Only flatshard_* symbols are exported.
    let syms = run(Command::new("nm").args(["-D", "--defined-only"]).arg(lib.join("libflatshard.so")));
    let foreign: Vec<&str> =
        syms.lines().filter_map(|l| l.split_whitespace().nth(2)).filter(|s| !s.starts_with("flatshard_") && !s.starts_with("FLATSHARD_")).collect();
    assert!(foreign.is_empty(), "unexpected exported symbols: {foreign:?}");

    let work = tmpdir("consumer");
    let pc = lib.join("pkgconfig");
    let pkg = |args: &[&str]| -> Vec<String> {
        run(Command::new("pkg-config").env("PKG_CONFIG_PATH", &pc).args(args).arg("flatshard")).split_whitespace().map(String::from).collect()
    };
    let cflags = pkg(&["--cflags"]);
    let libs = pkg(&["--libs"]);
    let libs_static = pkg(&["--libs", "--static"]);
    let src = root.join("tests/install/hello.c");
    // shared
    let exe = work.join("hello_shared");
    run(Command::new("cc").args(["-std=c11", "-Wall", "-Wextra", "-Werror"]).args(&cflags).arg(&src).arg("-o").arg(&exe).args(&libs));
    let out = run(Command::new(&exe).env("LD_LIBRARY_PATH", &lib));
    assert!(out.contains("sum-ok=1"), "{out}");
    // static: name the archive so the linker cannot pick the .so
    let exe = work.join("hello_static");
    let static_libs: Vec<String> = libs_static.iter().filter(|a| *a != "-lflatshard").cloned().collect();
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .args(&cflags)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(lib.join("libflatshard.a"))
        .args(&static_libs));
    let ldd = run(Command::new("ldd").arg(&exe));
    assert!(!ldd.contains("libflatshard"), "static build still links the .so:\n{ldd}");
    assert!(run(&mut Command::new(&exe)).contains("sum-ok=1"));

    // CMake, C++17, both targets
    let build = work.join("cmake-build");
    run(Command::new("cmake").arg("-S").arg(root.join("tests/install")).arg("-B").arg(&build).arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display())));
    run(Command::new("cmake").arg("--build").arg(&build));
    let out = run(Command::new(build.join("hello_shared")).env("LD_LIBRARY_PATH", &lib));
    assert!(out.contains("v0=1.5"), "{out}");
    let out = run(&mut Command::new(build.join("hello_static")));
    assert!(out.contains("v0=1.5"), "{out}");
    let _ = std::fs::remove_dir_all(&prefix);
    let _ = std::fs::remove_dir_all(&work);
}
