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
