//! The C types of API.md §2. Enums that come *in* from C are carried as
//! `int32_t`-sized wrappers (`*Arg`) and validated, so an out-of-range value is
//! INVALID_ARGUMENT rather than undefined behaviour; cbindgen renames them to
//! the enum's C name, so the header reads `flatshard_dtype dt`.

use std::ffi::c_void;

/// Status of every fallible call; 0 = success.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum flatshard_status {
    FLATSHARD_OK = 0,
    /// Bad pointer, size, enum or option combination.
    FLATSHARD_ERR_INVALID_ARGUMENT,
    /// E.g. view while sharded, nested unshard.
    FLATSHARD_ERR_INVALID_STATE,
    /// Documented unsupported combination or platform.
    FLATSHARD_ERR_UNSUPPORTED,
    /// Ranks disagree: layout, dtype, count, group.
    FLATSHARD_ERR_MISMATCH,
    /// A collective or rendezvous passed its deadline.
    FLATSHARD_ERR_TIMEOUT,
    /// A peer closed, died or sent garbage.
    FLATSHARD_ERR_PEER_LOST,
    /// A peer failed the job-token handshake.
    FLATSHARD_ERR_AUTH,
    /// The communicator was aborted; it stays unusable.
    FLATSHARD_ERR_ABORTED,
    FLATSHARD_ERR_OUT_OF_MEMORY,
    /// A socket, file or shared-memory system call failed.
    FLATSHARD_ERR_IO,
    FLATSHARD_ERR_CUDA,
    FLATSHARD_ERR_NCCL,
    /// A bug; the message says where.
    FLATSHARD_ERR_INTERNAL,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum flatshard_dtype {
    FLATSHARD_F32 = 0,
    FLATSHARD_F64,
    FLATSHARD_F16,
    FLATSHARD_BF16,
    FLATSHARD_I32,
    FLATSHARD_I64,
    FLATSHARD_U8,
}

// The Rust enums and the C ones number their values alike (the library
// converts between them with `as`): checked when the crate compiles.
const _: () = {
    use crate::dtype::{DType, ReduceOp};
    assert!(flatshard_dtype::FLATSHARD_F32 as i32 == DType::F32 as i32);
    assert!(flatshard_dtype::FLATSHARD_F64 as i32 == DType::F64 as i32);
    assert!(flatshard_dtype::FLATSHARD_F16 as i32 == DType::F16 as i32);
    assert!(flatshard_dtype::FLATSHARD_BF16 as i32 == DType::BF16 as i32);
    assert!(flatshard_dtype::FLATSHARD_I32 as i32 == DType::I32 as i32);
    assert!(flatshard_dtype::FLATSHARD_I64 as i32 == DType::I64 as i32);
    assert!(flatshard_dtype::FLATSHARD_U8 as i32 == DType::U8 as i32);
    assert!(flatshard_reduce_op::FLATSHARD_SUM as i32 == ReduceOp::Sum as i32);
    assert!(flatshard_reduce_op::FLATSHARD_AVG as i32 == ReduceOp::Avg as i32);
    assert!(flatshard_reduce_op::FLATSHARD_MIN as i32 == ReduceOp::Min as i32);
    assert!(flatshard_reduce_op::FLATSHARD_MAX as i32 == ReduceOp::Max as i32);
};

impl flatshard_status {
    /// Every status, in numbering order.
    pub const ALL: [flatshard_status; 14] = {
        use flatshard_status::*;
        [
            FLATSHARD_OK,
            FLATSHARD_ERR_INVALID_ARGUMENT,
            FLATSHARD_ERR_INVALID_STATE,
            FLATSHARD_ERR_UNSUPPORTED,
            FLATSHARD_ERR_MISMATCH,
            FLATSHARD_ERR_TIMEOUT,
            FLATSHARD_ERR_PEER_LOST,
            FLATSHARD_ERR_AUTH,
            FLATSHARD_ERR_ABORTED,
            FLATSHARD_ERR_OUT_OF_MEMORY,
            FLATSHARD_ERR_IO,
            FLATSHARD_ERR_CUDA,
            FLATSHARD_ERR_NCCL,
            FLATSHARD_ERR_INTERNAL,
        ]
    };

    /// The status a C caller passed back in, if it is one.
    pub fn from_raw(v: i32) -> Option<flatshard_status> {
        Self::ALL.iter().copied().find(|s| *s as i32 == v)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum flatshard_reduce_op {
    FLATSHARD_SUM = 0,
    FLATSHARD_AVG,
    FLATSHARD_MIN,
    FLATSHARD_MAX,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum flatshard_device_type {
    FLATSHARD_DEVICE_CPU = 0,
    FLATSHARD_DEVICE_CUDA,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum flatshard_transport {
    /// Shared memory within a host, TCP across hosts.
    FLATSHARD_TRANSPORT_AUTO = 0,
    FLATSHARD_TRANSPORT_TCP,
    FLATSHARD_TRANSPORT_SHM,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum flatshard_sharding {
    FLATSHARD_FULL_SHARD = 0,
    FLATSHARD_SHARD_GRAD_OP,
    FLATSHARD_NO_SHARD,
    FLATSHARD_HYBRID_SHARD,
}

macro_rules! int_arg {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name(pub i32);
    };
}
pub use crate::dtype::{DtypeArg, ReduceOpArg};
int_arg!(
    /// `flatshard_device_type` as received from C.
    DeviceTypeArg
);
int_arg!(
    /// `flatshard_transport` as received from C.
    TransportArg
);
int_arg!(
    /// `flatshard_sharding` as received from C.
    ShardingArg
);
int_arg!(
    /// `flatshard_status` as received from C.
    StatusArg
);

/// Where a tensor lives.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct flatshard_device {
    pub r#type: DeviceTypeArg,
    pub index: i32,
}

/// A caller-owned tensor: contiguous memory, described not copied.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct flatshard_tensor {
    /// Element 0; host or device pointer.
    pub data: *mut c_void,
    /// Gradient of the same size/dtype, or NULL (no grad).
    pub grad: *mut c_void,
    pub numel: u64,
    pub dtype: DtypeArg,
    pub device: flatshard_device,
}

/// Options for `flatshard_comm_init*`. NULL or zero-filled = defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct flatshard_comm_options {
    /// sizeof(flatshard_comm_options), set by flatshard_comm_options_init(); 0 = first layout.
    pub struct_size: u32,
    /// Per collective and rendezvous; 0 = 600000 (10 min).
    pub timeout_ms: u32,
    /// Job secret; NULL = env FLATSHARD_TOKEN; unset = none.
    pub token: *const std::ffi::c_char,
    /// NULL = the interface that reaches master_addr.
    pub bind_addr: *const std::ffi::c_char,
    /// AUTO (0): shm within a host, TCP across hosts.
    pub transport: TransportArg,
}

pub use crate::comm::callbacks::flatshard_collectives;

use crate::error::{Error, Result};
use crate::tensor::{Device, TensorRef};

/// Validate a C tensor description; `what` names it in errors ("params[3]").
/// Pointers are not dereferenced here.
pub(crate) fn tensor_from_c(t: &flatshard_tensor, what: &str) -> Result<TensorRef> {
    let dtype = crate::dtype::DType::from_raw(t.dtype.0 as i64, &format!("{what}.dtype"))?;
    let device = match t.device.r#type.0 {
        0 => Device::Cpu,
        1 => Device::Cuda(t.device.index),
        v => return Err(Error::invalid_arg(format!("{what}.device.type: {v} is not a flatshard_device_type (0..=1)"))),
    };
    dtype.bytes(t.numel, &format!("{what}.numel"))?;
    if t.numel > 0 && t.data.is_null() {
        return Err(Error::invalid_arg(format!("{what}.data is NULL but numel is {}", t.numel)));
    }
    Ok(TensorRef { data: t.data as *mut u8, grad: t.grad as *mut u8, numel: t.numel, dtype, device })
}

/// Describe a library-owned (or caller-owned) tensor for C.
pub(crate) fn tensor_to_c(t: &TensorRef) -> flatshard_tensor {
    let (ty, index) = match t.device {
        Device::Cpu => (0, 0),
        Device::Cuda(i) => (1, i),
    };
    flatshard_tensor {
        data: t.data as *mut c_void,
        grad: t.grad as *mut c_void,
        numel: t.numel,
        dtype: DtypeArg(t.dtype as i32),
        device: flatshard_device { r#type: DeviceTypeArg(ty), index },
    }
}

/// A caller's buffer, in host or device memory (whichever `p` is).
pub(crate) fn region_at(p: *const c_void, len: usize) -> crate::mem::Region {
    use crate::mem::{Place, Region};
    Region::new(p as *mut u8, len, crate::cuda::device_of(p as *const u8).map_or(Place::Host, Place::Device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    /// Status names come from the enum itself, in numbering order, and an
    /// unknown value has its own name.
    #[test]
    fn status_names_follow_the_enum() {
        for (i, s) in flatshard_status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            // SAFETY: flatshard_status_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(crate::ffi::flatshard_status_name(StatusArg(i as i32))) };
            assert_eq!(name.to_str().unwrap(), format!("{s:?}"));
        }
        assert_eq!(flatshard_status::ALL[13], flatshard_status::FLATSHARD_ERR_INTERNAL);
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(crate::ffi::flatshard_status_name(StatusArg(14))) };
        assert_eq!(unknown.to_str().unwrap(), "FLATSHARD_UNKNOWN_STATUS");
    }
}
