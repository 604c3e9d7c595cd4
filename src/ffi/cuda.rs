//! C API §6: NCCL communicators and CUDA staging.

use super::comm::{comm_ref, flatshard_comm};
#[cfg(feature = "cuda")]
use super::{boundary, need, types::*};
#[cfg(feature = "cuda")]
use crate::comm::Comm;

use std::ffi::{c_char, c_void};

/// Create an NCCL communicator on `cuda_device`, ordered on `cuda_stream` (a
/// CUstream / cudaStream_t of that device; NULL = the legacy default stream).
/// The ncclUniqueId travels through the TCP rendezvous on
/// master_addr:master_port, authenticated by the job token; before
/// ncclCommInitRank (which has no deadline) the ranks check that each can use
/// its device. NCCL needs one GPU per rank. NCCL is found as
/// FLATSHARD_NCCL_LIBRARY if set, else the libnccl.so.2 already loaded in the
/// process, else libnccl.so.2 / libnccl.so on the search path; NCCL 2.10 or
/// newer (ncclAvg), 2.18 or newer for split. Host pointers given to its
/// collectives are staged through device memory. Results of AVG/SUM can differ
/// from a host communicator's in the last bits (NCCL's reduction order and AVG
/// scaling).
///
/// Ownership: `master_addr` and `*opts` are read during the call only;
/// `cuda_stream` stays the caller's and must outlive the communicator. On
/// success `*out` owns the communicator: flatshard_comm_free destroys the NCCL
/// communicator after this rank's queued work.
///
/// Threads: collective: every rank of the job calls it once. Any thread.
///
/// Statuses: OK; INVALID_ARGUMENT (as flatshard_comm_init: NULL out, address,
/// rank, size, port, options, settings); UNSUPPORTED (no CUDA driver, no usable
/// NCCL, or built without the `cuda` feature; rank 0 could not create an
/// ncclUniqueId); MISMATCH (another rank cannot use its CUDA device; job-wide
/// settings differ); TIMEOUT, AUTH, PEER_LOST, IO (the rendezvous, as
/// flatshard_comm_init); CUDA (cuda_device is not usable here); NCCL
/// (ncclCommInitRank failed).
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_init_nccl(
    master_addr: *const c_char,
    master_port: u16,
    rank: i32,
    world_size: i32,
    cuda_device: i32,
    cuda_stream: *mut c_void,
    opts: *const flatshard_comm_options,
    out: *mut *mut flatshard_comm,
) -> flatshard_status {
    boundary("flatshard_comm_init_nccl", || {
        need(out, "out")?;
        // SAFETY: the C contract: opts is NULL or a valid options struct,
        // master_addr NULL (world 1) or a NUL-terminated string.
        let opts = unsafe { super::comm::parse_options(opts)? };
        // SAFETY: as above.
        let addr = unsafe { super::comm::master_addr_arg(master_addr, world_size)? };
        #[cfg(feature = "cuda")]
        {
            let c = Comm::init_nccl(&addr, master_port, rank, world_size, cuda_device, cuda_stream, opts)?;
            super::comm::publish(c, out);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (addr, master_port, rank, world_size, cuda_device, cuda_stream, opts);
            crate::cuda::nccl()
        }
    })
}

/// Adopt an existing ncclComm_t, not owned: flatshard never destroys or aborts
/// it (not at flatshard_comm_free, flatshard_comm_abort, or a timeout, which
/// then only poison the wrapper; aborting the NCCL communicator is its owner's
/// call). Collectives are ordered on `cuda_stream` (NULL = the legacy default
/// stream); waits use the default timeout (600000 ms). The communicator must
/// come from the NCCL library flatshard uses: FLATSHARD_NCCL_LIBRARY if set,
/// else the one already loaded in the process (libnccl.so.2), else the search
/// path.
///
/// Ownership: `nccl_comm` and `cuda_stream` stay the caller's and must outlive
/// the flatshard communicator (every flat param and averager built on it
/// included). On success `*out` owns the wrapper (flatshard_comm_free).
///
/// Threads: not collective (no communication). Any thread.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL out or nccl_comm; cuda_device is not
/// the communicator's device; a malformed FLATSHARD_* setting); UNSUPPORTED (no
/// CUDA driver, no usable NCCL, or built without the `cuda` feature); CUDA
/// (cuda_device is not usable here); NCCL (NCCL refused to describe the
/// communicator).
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_wrap_nccl(
    nccl_comm: *mut c_void,
    cuda_device: i32,
    cuda_stream: *mut c_void,
    out: *mut *mut flatshard_comm,
) -> flatshard_status {
    boundary("flatshard_comm_wrap_nccl", || {
        need(out, "out")?;
        need(nccl_comm, "nccl_comm")?;
        #[cfg(feature = "cuda")]
        {
            let b = crate::comm::nccl::NcclBackend::wrap(nccl_comm, cuda_device, cuda_stream, crate::comm::CommOptions::default().timeout)?;
            let c = Comm::from_backend(Box::new(b), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)))?;
            super::comm::publish(c, out);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cuda_device, cuda_stream);
            crate::cuda::nccl()
        }
    })
}

/// Wait for the work queued on the communicator's stream, up to the timeout.
/// Reports asynchronous NCCL errors and aborts an owned NCCL communicator on
/// timeout. On a host or callback communicator it returns OK at once (their
/// collectives complete before returning).
///
/// Ownership: `c` stays the caller's; nothing else is passed.
///
/// Threads: not concurrently with other calls on `c` (flatshard_comm_abort
/// excepted; on an NCCL communicator the abort takes effect here, within 50
/// µs). Not collective, but it waits for collectives that need every rank.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed c); TIMEOUT (the work did not
/// finish within the timeout; c is poisoned and an owned NCCL communicator
/// aborted); NCCL (an asynchronous NCCL error; c is poisoned); ABORTED (c was
/// aborted or poisoned before); CUDA (the stream reported an error).
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_synchronize(c: *mut flatshard_comm) -> flatshard_status {
    // SAFETY: `c` is NULL or a handle from this library (C contract).
    boundary("flatshard_comm_synchronize", || unsafe { comm_ref(c, "c") }?.synchronize())
}
