//! `flatshard-run`: start N ranks of a program on this host, torchrun-style.
//!
//! ```text
//! flatshard-run -n 4 [--master-port P] [--master-addr A] -- ./prog args...
//! ```
//! Each rank gets MASTER_ADDR, MASTER_PORT (a free port unless given), RANK,
//! WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and one fresh random
//! FLATSHARD_TOKEN shared by the job. Every output line is prefixed with
//! "[rank N] ". SIGINT/SIGTERM are forwarded to the ranks (which run in their
//! own process group, so a terminal's Ctrl-C reaches them once, through us).
//! When a rank fails the others are stopped (SIGTERM, then SIGKILL after a
//! grace period) and the launcher exits with the failed rank's code
//! (128 + signal for a rank killed by a signal).

#![warn(clippy::undocumented_unsafe_blocks)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Grace period between SIGTERM and SIGKILL when stopping ranks.
const GRACE: Duration = Duration::from_secs(5);

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(sig, Ordering::SeqCst);
}

const USAGE: &str = "usage: flatshard-run -n N [--master-port P] [--master-addr A] -- PROGRAM [ARGS...]

Starts N ranks of PROGRAM on this host with torchrun's variables (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and a fresh
FLATSHARD_TOKEN; prefixes output lines with the rank; forwards Ctrl-C; if a
rank fails, stops the others and exits with its code.";

struct Args {
    n: usize,
    port: Option<u16>,
    addr: String,
    prog: Vec<String>,
}

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut n = None;
    let mut port = None;
    let mut addr = "127.0.0.1".to_string();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        let mut value = |name: &str| -> Result<String, String> {
            i += 1;
            argv.get(i).cloned().ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "-n" | "--nproc" | "--nproc-per-node" | "--nproc_per_node" => {
                let v = value(a)?;
                n = Some(v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or(format!("{a}: '{v}' is not a positive integer"))?);
            }
            "--master-port" | "--master_port" => {
                let v = value(a)?;
                port = Some(v.parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("{a}: '{v}' is not a port (1..=65535)"))?);
            }
            "--master-addr" | "--master_addr" => addr = value(a)?,
            "--" => {
                let prog: Vec<String> = argv[i + 1..].to_vec();
                if prog.is_empty() {
                    return Err("no program after --".into());
                }
                return Ok(Args { n: n.ok_or("-n N is required")?, port, addr, prog });
            }
            other => return Err(format!("unknown argument '{other}' (the program goes after --)")),
        }
        i += 1;
    }
    Err("missing -- PROGRAM".into())
}

/// A port free on loopback now, below the ephemeral range (an outgoing
/// connection made before rank 0 binds it cannot take it).
fn free_port() -> std::io::Result<u16> {
    flatshard::comm::launch::free_port("127.0.0.1")
}

/// 128 bits from /dev/urandom, hex-encoded.
fn fresh_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Copy lines from a rank's pipe to our stdout/stderr with a prefix.
fn pump(src: impl Read + Send + 'static, prefix: String, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    // One write per line under the stream's lock: lines never interleave.
                    let _ = if to_stderr {
                        let mut e = std::io::stderr().lock();
                        e.write_all(prefix.as_bytes()).and_then(|_| e.write_all(&line))
                    } else {
                        let mut o = std::io::stdout().lock();
                        o.write_all(prefix.as_bytes()).and_then(|_| o.write_all(&line)).and_then(|_| o.flush())
                    };
                }
            }
        }
    })
}

fn code_of(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn describe(st: ExitStatus) -> String {
    match st.code() {
        Some(c) => format!("exit code {c}"),
        None => format!("signal {}", st.signal().unwrap_or(0)),
    }
}

fn signal_all(children: &[Child], done: &[Option<ExitStatus>], sig: libc::c_int) {
    for (ch, d) in children.iter().zip(done) {
        if d.is_none() {
            // The rank leads its own process group: reach its children too.
            // SAFETY: kill takes plain integers; a stale group id only fails.
            unsafe { libc::kill(-(ch.id() as libc::pid_t), sig) };
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("flatshard-run: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(if e.is_empty() { 0 } else { 2 });
        }
    };
    let port = match args.port.map(Ok).unwrap_or_else(free_port) {
        Ok(p) => p,
        Err(e) => fail(&format!("cannot find a free port: {e}")),
    };
    let token = fresh_token().unwrap_or_else(|e| fail(&format!("cannot read /dev/urandom: {e}")));
    // SAFETY: on_signal is an extern "C" handler that only stores to an atomic
    // (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    let mut children = Vec::with_capacity(args.n);
    let mut pumps = Vec::new();
    for r in 0..args.n {
        let mut c = Command::new(&args.prog[0]);
        c.args(&args.prog[1..])
            .env("MASTER_ADDR", &args.addr)
            .env("MASTER_PORT", port.to_string())
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", args.n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", args.n.to_string())
            .env("FLATSHARD_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        match c.spawn() {
            Ok(mut ch) => {
                let prefix = format!("[rank {r}] ");
                pumps.push(pump(ch.stdout.take().expect("piped"), prefix.clone(), false));
                pumps.push(pump(ch.stderr.take().expect("piped"), prefix, true));
                children.push(ch);
            }
            Err(e) => {
                eprintln!("flatshard-run: cannot start '{}' for rank {r}: {e}", args.prog[0]);
                let done = vec![None; children.len()];
                signal_all(&children, &done, libc::SIGKILL);
                for ch in &mut children {
                    let _ = ch.wait();
                }
                std::process::exit(127);
            }
        }
    }

    let mut done: Vec<Option<ExitStatus>> = vec![None; args.n];
    let mut result: Option<i32> = None; // exit code once decided
    let mut stop_deadline: Option<Instant> = None;
    while done.iter().any(|d| d.is_none()) {
        let sig = SIGNALLED.swap(0, Ordering::SeqCst);
        if sig != 0 {
            eprintln!("flatshard-run: got signal {sig}; forwarding it to the ranks");
            signal_all(&children, &done, sig);
            result.get_or_insert(128 + sig);
            stop_deadline.get_or_insert(Instant::now() + GRACE);
        }
        for (r, ch) in children.iter_mut().enumerate() {
            if done[r].is_some() {
                continue;
            }
            if let Ok(Some(st)) = ch.try_wait() {
                done[r] = Some(st);
                if !st.success() && result.is_none() {
                    eprintln!("flatshard-run: rank {r} failed ({}); stopping the other ranks", describe(st));
                    result = Some(code_of(st));
                    let pending = done.clone();
                    signal_all(&children, &pending, libc::SIGTERM);
                    stop_deadline = Some(Instant::now() + GRACE);
                    break;
                }
            }
        }
        if let Some(d) = stop_deadline {
            if Instant::now() > d {
                signal_all(&children, &done, libc::SIGKILL);
                stop_deadline = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if result.is_some() {
        // Stopped job: leave nothing behind (e.g. a shell's background job that
        // ignores SIGINT and would keep the output pipes open).
        signal_all(&children, &vec![None; args.n], libc::SIGKILL);
    }
    // Drain what the ranks wrote; don't wait forever on pipes that some
    // leftover grandchild still holds open.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::io::stdout().flush();
    std::process::exit(result.unwrap_or(0));
}

fn fail(msg: &str) -> ! {
    eprintln!("flatshard-run: {msg}");
    std::process::exit(2);
}
