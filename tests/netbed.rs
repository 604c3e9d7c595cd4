//! The multi-host test bed itself (scripts/netbed.sh): distinct hostnames,
//! connectivity over 198.18.0.0/15, silent partitions, rate limits, teardown.
//! Skips with a reason where network namespaces are unavailable.
mod common;

use common::netbed::{self, NetBed};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn run_on(bed: &NetBed, host: usize, script: &str) -> String {
    let out = bed.command(host, "python3").args(["-c", script]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "host {host}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn bed_hosts_have_own_names_and_addresses() {
    let Some(bed) = netbed::bed_or_skip("bed_hosts_have_own_names_and_addresses", 3, None) else { return };
    for h in 0..3 {
        let got = run_on(&bed, h, "import socket; print(open('/proc/sys/kernel/hostname').read().strip())");
        assert_eq!(got, bed.hostname(h));
        let a = run_on(&bed, h, "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('198.18.0.1', 9)); print(s.getsockname()[0])");
        assert_eq!(a, bed.addr(h), "host {h}'s address towards host 0");
    }
    // this process's hostname is untouched
    assert_ne!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(), bed.hostname(0));
}

#[test]
fn bed_connects_partitions_and_heals() {
    let Some(bed) = netbed::bed_or_skip("bed_connects_partitions_and_heals", 2, None) else { return };
    // a listener on host 0 that echoes one line per connection
    let mut server = bed
        .command(0, "python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('198.18.0.1', 7000)); s.listen()\nprint('ready', flush=True)\nwhile True:\n  c,_=s.accept(); c.sendall(c.recv(100)); c.close()",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 5];
    server.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    let probe = "import socket\ntry:\n  c=socket.create_connection(('198.18.0.1', 7000), timeout=2); c.sendall(b'hi'); print(c.recv(10).decode())\nexcept OSError as e:\n  print('unreachable', type(e).__name__)";
    assert_eq!(run_on(&bed, 1, probe), "hi");
    bed.link(0, false);
    let t = Instant::now();
    let got = run_on(&bed, 1, probe);
    // silent: a timeout, not a reset or an unreachable error
    assert_eq!(got, "unreachable TimeoutError", "partitioned link");
    assert!(t.elapsed() >= Duration::from_millis(1500));
    bed.link(0, true);
    let mut healed = String::new();
    for _ in 0..10 {
        healed = run_on(&bed, 1, probe);
        if healed == "hi" {
            break;
        }
    }
    assert_eq!(healed, "hi", "after the link came back");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn bed_rate_limit_holds() {
    let Some(bed) = netbed::bed_or_skip("bed_rate_limit_holds", 2, Some("200mbit")) else { return };
    let mut server = bed
        .command(0, "python3")
        .args([
            "-c",
            "import socket\ns=socket.socket(); s.bind(('198.18.0.1', 7001)); s.listen(); print('ready', flush=True)\nc,_=s.accept(); n=0\nwhile True:\n  b=c.recv(1<<20)\n  if not b: break\n  n+=len(b)\nprint(n, flush=True)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    server.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    // 25 MB at 200 Mbit/s takes >= 1 s; unlimited veth would take ~0.05 s
    let secs: f64 = run_on(&bed, 1, "import socket,time\nc=socket.create_connection(('198.18.0.1', 7001)); b=bytes(1<<20); t=time.time()\nfor _ in range(25): c.sendall(b)\nc.shutdown(socket.SHUT_WR); c.recv(1); print(time.time()-t)")
        .parse()
        .unwrap();
    let mut got = String::new();
    server.stdout.as_mut().unwrap().read_to_string(&mut got).unwrap();
    let _ = server.wait();
    assert_eq!(got.trim(), (25u64 << 20).to_string());
    let mbit = 25.0 * 8.0 * 1.048576 / secs;
    println!("#: 200mbit bed: {mbit:.0} Mbit/s measured");
    assert!(mbit < 240.0, "rate limit not applied: {mbit:.0} Mbit/s through a 200mbit link");
    let _ = std::io::stdout().flush();
}

#[test]
fn bed_is_torn_down_on_drop() {
    let Some(bed) = netbed::bed_or_skip("bed_is_torn_down_on_drop", 2, Some("1gbit")) else { return };
    let name = bed.name().to_string();
    let ns = |n: &str| std::path::Path::new("/run/netns").join(n).exists();
    assert!(ns(&format!("{name}-h0")) && ns(&format!("{name}-h1")) && ns(&format!("{name}-br")));
    drop(bed);
    assert!(!ns(&format!("{name}-h0")) && !ns(&format!("{name}-h1")) && !ns(&format!("{name}-br")), "bed {name} left namespaces behind");
}
