//! One error type for the whole library. The C boundary maps `ErrorKind` to
//! `flatshard_status` and stores `msg` as the thread's last error.

use std::fmt;

/// What went wrong, in the vocabulary of the C API's `flatshard_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    InvalidState,
    Unsupported,
    Mismatch,
    Timeout,
    PeerLost,
    Auth,
    Aborted,
    OutOfMemory,
    Io,
    Cuda,
    Nccl,
    Internal,
}

/// An error with a message that says what was expected, what was found, and
/// (where it helps) what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub msg: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error { kind, msg: msg.into() }
    }
    pub fn invalid_arg(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }
    pub fn invalid_state(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidState, msg)
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }
    pub fn mismatch(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, msg)
    }
    pub fn timeout(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, msg)
    }
    pub fn peer_lost(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::PeerLost, msg)
    }
    pub fn auth(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Auth, msg)
    }
    pub fn aborted(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Aborted, msg)
    }
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, msg)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, msg)
    }
    pub fn oom(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfMemory, msg)
    }
    /// Prefix the message with context (e.g. "rank 2: all_reduce: ").
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }
    /// Errors after which the communicator cannot be trusted any more.
    pub fn poisons(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout | ErrorKind::PeerLost | ErrorKind::Aborted | ErrorKind::Io | ErrorKind::Auth | ErrorKind::Internal | ErrorKind::Nccl
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.msg)
    }
}

impl std::error::Error for Error {}

/// Allocate a zero-filled byte buffer, reporting failure instead of aborting.
pub fn try_zeroed(len: usize, what: &str) -> Result<Vec<u8>> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::oom(format!("cannot allocate {len} bytes for {what}")))?;
    v.resize(len, 0);
    Ok(v)
}
