//! flatshard-run with real programs: the environment it sets, the rank prefix,
//! a real flatshard job (examples-c/collectives_demo.c), failure propagation
//! and Ctrl-C forwarding.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const RUN: &str = env!("CARGO_BIN_EXE_flatshard-run");

fn run(args: &[&str]) -> Output {
    Command::new(RUN).args(args).stdin(Stdio::null()).output().expect("run flatshard-run")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Lines of `out` from rank `r`, prefix removed.
fn lines_of(out: &str, r: usize) -> Vec<String> {
    let p = format!("[rank {r}] ");
    out.lines().filter_map(|l| l.strip_prefix(&p).map(str::to_string)).collect()
}

#[test]
fn sets_torchrun_variables_and_a_fresh_token() {
    let script = r#"echo "env $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $FLATSHARD_TOKEN"; printf 'no newline'"#;
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let o = run(&["-n", "3", "--", "sh", "-c", script]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}");
        let mut port_token = None;
        for r in 0..3 {
            let ls = lines_of(&out, r);
            assert_eq!(ls.len(), 2, "rank {r}: {out}");
            assert_eq!(ls[1], "no newline");
            let f: Vec<&str> = ls[0].split(' ').collect();
            assert_eq!(f.len(), 8, "{}", ls[0]);
            assert_eq!(&f[..6], &["env", &r.to_string(), "3", &r.to_string(), "3", "127.0.0.1"], "{}", ls[0]);
            assert!(f[6].parse::<u16>().unwrap() > 0);
            assert_eq!(f[7].len(), 32, "token of 128 bits in hex: {}", f[7]);
            let pt = (f[6].to_string(), f[7].to_string());
            assert_eq!(port_token.get_or_insert(pt.clone()), &pt, "every rank shares port and token");
        }
        tokens.push(port_token.unwrap().1);
    }
    assert_ne!(tokens[0], tokens[1], "each job gets a fresh token");

    let o = run(&["-n", "1", "--master-port", "23456", "--", "sh", "-c", "echo $MASTER_PORT"]);
    assert_eq!(lines_of(&text(&o), 0), vec!["23456"]);
}

#[test]
fn bad_usage_is_reported() {
    for args in [&["--", "true"][..], &["-n", "0", "--", "true"], &["-n", "2"], &["-n", "2", "true"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("usage:"), "{}", text(&o));
    }
    let o = run(&["-n", "2", "--", "/nonexistent/program"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
}

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let t0 = Instant::now();
    let o = run(&["-n", "3", "--", "sh", "-c", r#"if [ "$RANK" = 1 ]; then sleep 0.2; echo bye; exit 7; fi; sleep 60"#]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(7), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(20), "others were not stopped: {:?}", t0.elapsed());
    assert_eq!(lines_of(&out, 1), vec!["bye"]);
    assert!(out.contains("rank 1 failed (exit code 7)"), "{out}");

    // Killed by a signal: 128 + signal.
    let o = run(&["-n", "2", "--", "sh", "-c", r#"if [ "$RANK" = 0 ]; then kill -9 $$; fi; sleep 60"#]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
}

#[test]
fn ctrl_c_is_forwarded() {
    let script = r#"trap 'echo got-int; exit 3' INT; echo ready; sleep 60 & wait"#;
    let mut child =
        Command::new(RUN).args(["-n", "2", "--", "sh", "-c", script]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    // Wait until both ranks have installed their trap.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = 0;
    let mut line = String::new();
    while seen < 2 {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0, "launcher ended early");
        if line.ends_with("ready\n") {
            seen += 1;
        }
    }
    let t0 = Instant::now();
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let st = child.wait().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_eq!(st.code(), Some(130), "128 + SIGINT; output: {rest}");
    assert!(rest.contains("[rank 0] got-int") && rest.contains("[rank 1] got-int"), "{rest}");
}

/// The C++17 example (include/flatshard.hpp) on 2 ranks through the launcher.
#[test]
fn cpp_example_runs_on_two_ranks() {
    let exe = build_example("g++", &["-std=c++17", "-O1"], "cpp_example.cpp");
    let ckpt = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cpp_example_ckpt-{}", std::process::id()));
    let o = run(&["-n", "2", "--", exe.to_str().unwrap(), ckpt.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&ckpt);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("C++ example OK: 2 ranks"), "{out}");
}

/// Compile examples-c/<src> with `compiler` against the library of this build
/// (-Wall -Wextra -Werror plus `flags`); returns the executable.
fn build_example(compiler: &str, flags: &[&str], src: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stem = src.split('.').next().unwrap_or(src);
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{stem}-{}", std::process::id()));
    let lib = lib_dir();
    let o = Command::new(compiler)
        .args(["-Wall", "-Wextra", "-Werror"])
        .args(flags)
        .arg("-I")
        .arg(repo.join("include"))
        .arg(repo.join("examples-c").join(src))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg("-lflatshard")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{compiler} {src} failed:\n{}", text(&o));
    exe
}

/// target/<profile>/deps, beside this test binary: cargo test builds
/// libflatshard.{so,a} there (it only copies them up to target/<profile> on
/// `cargo build`), so this is the library of the same sources as the test.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// A real flatshard job: the C collectives demo, 4 ranks, through the launcher.
#[test]
fn runs_a_real_flatshard_job() {
    let exe = build_example("cc", &["-std=c11", "-pedantic", "-O2"], "collectives_demo.c");
    let o = run(&["-n", "4", "--", exe.to_str().unwrap(), "--quick"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let r0 = lines_of(&out, 0).join("\n");
    assert!(r0.contains("all results verified"), "{out}");
    assert!(!out.contains("MISMATCH") && !out.contains("FAILED"), "{out}");
}

/// The demo (prefetching with unshard_async, reduce_grads_async overlapped
/// with backward, API §7) under AddressSanitizer + UBSan on 2 ranks.
#[test]
fn demo_runs_under_asan() {
    let exe = build_example(
        "cc",
        &["-std=c11", "-pedantic", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-lm"],
        "train_mlp.c",
    );
    let out_file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-asan-{}.safetensors", std::process::id()));
    let o = run(&["-n", "2", "--", exe.to_str().unwrap(), out_file.to_str().unwrap()]);
    let out = text(&o);
    let _ = std::fs::remove_file(&out_file);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("accuracy") && !out.contains("ERROR: AddressSanitizer"), "{out}");
}
