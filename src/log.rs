//! `FLATSHARD_DEBUG=WARN|INFO|TRACE` prints to stderr with a rank prefix
//! (like `NCCL_DEBUG`); silent by default.

use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Warn,
    Info,
    Trace,
}

pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| match std::env::var("FLATSHARD_DEBUG").unwrap_or_default().to_ascii_uppercase().as_str() {
        "WARN" => Level::Warn,
        "INFO" => Level::Info,
        "TRACE" => Level::Trace,
        _ => Level::Off,
    })
}

/// Pass `usize::MAX` as the rank where none is known (e.g. at the C boundary).
fn emit(l: Level, tag: &str, rank: usize, msg: &str) {
    if level() >= l {
        if rank == usize::MAX {
            eprintln!("[flatshard pid {}] {tag} {msg}", std::process::id());
        } else {
            eprintln!("[flatshard rank {rank}] {tag} {msg}");
        }
    }
}

pub fn warn(rank: usize, msg: &str) {
    emit(Level::Warn, "WARN", rank, msg)
}
pub fn info(rank: usize, msg: &str) {
    emit(Level::Info, "INFO", rank, msg)
}
pub fn trace(rank: usize, msg: &str) {
    emit(Level::Trace, "TRACE", rank, msg)
}
