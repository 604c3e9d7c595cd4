// Included (include!) by the test helpers that need a free loopback port.

/// A free TCP port on loopback for a test's rendezvous store, chosen below
/// Linux's ephemeral range (32768–60999): bind(0) would hand out a port from
/// that range, which any outgoing connection of a concurrently running test
/// (the TCP transport makes hundreds) may take between this check and the
/// test's own bind. Random per process and call, and checked free by binding.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = (std::process::id() as u64) << 32 ^ nanos ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
