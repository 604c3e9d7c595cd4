// Included (include!) by the test helpers that need a free loopback port.

/// A free TCP port on loopback for a test's rendezvous store, below the
/// ephemeral range (see `flatshard::comm::launch::free_port`).
pub fn free_port() -> u16 {
    flatshard::comm::launch::free_port("127.0.0.1").expect("no free loopback port")
}
