//! flatshard: FSDP-style flat-parameter sharding and local-SGD model averaging
//! for C and C++ training engines, over NCCL or an embedded host transport.
//!
//! The Rust API lives in the modules below; `ffi` is the C ABI on top of it.

#![deny(unsafe_op_in_unsafe_fn)]
// Every unsafe block says why it is sound (clippy -D warnings in the test command).
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod agree;
pub mod averaging;
pub mod checkpoint;
pub mod comm;
/// cbindgen:ignore
pub mod config;
pub mod convert;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod flat_param;
pub mod log;
pub mod mem;
pub mod memcopy;
pub mod reduce;
pub mod tensor;

pub use comm::{Comm, CommOptions, Transport};
pub use dtype::{DType, ReduceOp};
pub use error::{Error, ErrorKind, Result};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
