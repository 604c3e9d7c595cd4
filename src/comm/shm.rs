//! Shared-memory transport for groups whose ranks are all on this host.
//! (Placeholder until the shm transport lands: `available()` is false, so AUTO
//! picks TCP; forcing SHM reports UNSUPPORTED.)

use super::store::StoreClient;
use super::Backend;
use crate::error::{Error, Result};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub fn available() -> bool {
    false
}

/// Build the shm backend for one group (every rank of the group calls this).
#[allow(clippy::too_many_arguments)]
pub fn connect(
    _job: &str,
    _gid: &str,
    _rank: usize,
    _size: usize,
    _pids: &[i32],
    _store: &StoreClient,
    _timeout: Duration,
    _abort: Arc<AtomicBool>,
) -> Result<Box<dyn Backend>> {
    Err(Error::unsupported("transport: the shared-memory transport is not built yet; use FLATSHARD_TRANSPORT_TCP"))
}
