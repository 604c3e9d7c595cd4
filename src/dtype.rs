//! Element types and reduction operators, as the C API numbers them.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F64 = 1,
    F16 = 2,
    BF16 = 3,
    I32 = 4,
    I64 = 5,
    U8 = 6,
}

impl DType {
    /// Validate an integer coming from C; `what` names the argument.
    pub fn from_raw(v: i64, what: &str) -> Result<DType> {
        match v {
            0 => Ok(DType::F32),
            1 => Ok(DType::F64),
            2 => Ok(DType::F16),
            3 => Ok(DType::BF16),
            4 => Ok(DType::I32),
            5 => Ok(DType::I64),
            6 => Ok(DType::U8),
            _ => Err(Error::invalid_arg(format!("{what}: {v} is not a flatshard_dtype (valid: 0..=6, FLATSHARD_F32..FLATSHARD_U8)"))),
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
    /// Bytes for `count` elements, or an error naming the argument on overflow.
    pub fn bytes(self, count: u64, what: &str) -> Result<usize> {
        count
            .checked_mul(self.size() as u64)
            .filter(|b| *b <= isize::MAX as u64)
            .map(|b| b as usize)
            .ok_or_else(|| Error::invalid_arg(format!("{what}: {count} elements of {} overflow the address space", self.name())))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    Sum = 0,
    Avg = 1,
    Min = 2,
    Max = 3,
}

impl ReduceOp {
    pub fn from_raw(v: i64, what: &str) -> Result<ReduceOp> {
        match v {
            0 => Ok(ReduceOp::Sum),
            1 => Ok(ReduceOp::Avg),
            2 => Ok(ReduceOp::Min),
            3 => Ok(ReduceOp::Max),
            _ => Err(Error::invalid_arg(format!("{what}: {v} is not a flatshard_reduce_op (valid: 0..=3, FLATSHARD_SUM..FLATSHARD_MAX)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
        }
    }
    /// AVG on an integer dtype is refused (API.md §3).
    pub fn check(self, dt: DType) -> Result<()> {
        if self == ReduceOp::Avg && !dt.is_float() {
            return Err(Error::invalid_arg(format!("op: FLATSHARD_AVG needs a floating dtype, got {}", dt.name())));
        }
        Ok(())
    }
}

/// `flatshard_dtype` as received from C: read as an integer and validated
/// (`DType::from_raw`), never trusted as a Rust enum.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DtypeArg(pub i32);

/// `flatshard_reduce_op` as received from C.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReduceOpArg(pub i32);
