//! Communicators, split by concern:
//! - `wire`: the collective header every transport sends (op, count, dtype,
//!   root, sequence number) and its checks;
//! - `backend`: the `Backend` (host) and `DeviceCollectives` (NCCL) traits;
//!   the transports `shm`, `tcp` (with `net`, `auth`), `callbacks` (the C
//!   caller's own collectives and their table type) and `nccl`;
//! - `rendezvous`: joining a job through the `store` (or torchrun's agent
//!   store, `torchstore`; which launcher: `launch`), agreeing on settings,
//!   building a group's transport;
//! - `hier`: the hierarchical transport for groups that span hosts (shm
//!   inside a host, TCP between hosts, built from sub-groups of both);
//! - `handle`: `Comm`, what the rest of the library uses (argument checks,
//!   AVG, poisoning, splitting, routing of device pointers);
//! - `progress`: one order per communicator for blocking and asynchronous
//!   operations, the progress thread and work handles (API §7).

pub mod auth;
pub mod backend;
pub mod callbacks;
pub mod handle;
pub mod hier;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod net;
pub mod progress;
pub mod rendezvous;
pub mod shm;
pub mod store;
pub mod tcp;
#[cfg(test)]
pub(crate) mod testing;
pub mod torchstore;
pub mod wire;

pub use backend::{Backend, DeviceCollectives, SelfBackend};
pub use handle::Comm;
pub use rendezvous::JobCtx;
pub use wire::{OpDesc, OpKind};

use std::time::Duration;

/// Which host transport a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory when every member is on this host, TCP otherwise.
    Auto,
    Tcp,
    Shm,
}

#[derive(Debug, Clone)]
pub struct CommOptions {
    /// Per collective and per rendezvous.
    pub timeout: Duration,
    /// Job secret; `None` = env `FLATSHARD_TOKEN`; unset = no secret.
    pub token: Option<Vec<u8>>,
    /// Local address to listen on; `None` = the interface that reaches the master.
    pub bind_addr: Option<String>,
    pub transport: Transport,
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions { timeout: Duration::from_millis(600_000), token: None, bind_addr: None, transport: Transport::Auto }
    }
}
