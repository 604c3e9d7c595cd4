//! CUDA events for asynchronous work on NCCL communicators (API.md §7): the
//! `_async` call records an event on the communicator's stream after the
//! enqueued work; `wait` polls it (with the deadline and NCCL's asynchronous
//! errors, in the NCCL backend) and `wait_stream` makes another stream wait.

use super::Stream;
use crate::error::Result;

/// A recorded CUDA event (timing disabled), destroyed on drop.
pub struct Event {
    #[cfg(feature = "cuda")]
    ev: cudarc::driver::sys::CUevent,
    device: i32,
}

// SAFETY: a CUevent is a driver handle usable from any thread of the process
// once the right context is current (every use below makes it current).
unsafe impl Send for Event {}
// SAFETY: as above; the driver serialises concurrent calls on one event.
unsafe impl Sync for Event {}

impl Event {
    /// Record an event on `stream` of `device`, after the work queued there.
    pub fn record(device: i32, stream: Stream) -> Result<Event> {
        #[cfg(feature = "cuda")]
        {
            use cudarc::driver::sys as cu;
            super::set_device(device)?;
            let mut ev: cu::CUevent = std::ptr::null_mut();
            // SAFETY: valid out-pointer; the context of `device` is current.
            super::check(unsafe { cu::cuEventCreate(&mut ev, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }, "cuEventCreate")?;
            let e = Event { ev, device };
            // SAFETY: a live event and a stream of this device (or the default stream).
            super::check(unsafe { cu::cuEventRecord(ev, stream as cu::CUstream) }, "cuEventRecord")?;
            Ok(e)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (device, stream);
            super::driver().map(|_| Event { device })
        }
    }

    /// Has the stream passed the event? Err on a CUDA error.
    pub fn query(&self) -> Result<bool> {
        #[cfg(feature = "cuda")]
        {
            use cudarc::driver::sys as cu;
            super::set_device(self.device)?;
            // SAFETY: a live event.
            match unsafe { cu::cuEventQuery(self.ev) } {
                cu::CUresult::CUDA_SUCCESS => Ok(true),
                cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                r => super::check(r, "cuEventQuery").map(|_| false),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Ok(true)
    }

    /// Make `stream` (of this device) wait for the event; the host does not wait.
    pub fn stream_wait(&self, stream: Stream) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use cudarc::driver::sys as cu;
            super::set_device(self.device)?;
            // SAFETY: a live event; the caller's stream handle of this device.
            super::check(unsafe { cu::cuStreamWaitEvent(stream as cu::CUstream, self.ev, 0) }, "cuStreamWaitEvent")
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = stream;
            Ok(())
        }
    }

    pub fn device(&self) -> i32 {
        self.device
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if super::set_device(self.device).is_ok() {
            // SAFETY: the event is not used again; destroying an event that
            // is still pending is allowed (resources are freed once it completes).
            unsafe { cudarc::driver::sys::cuEventDestroy_v2(self.ev) };
        }
    }
}
