//! Caller-owned tensors: described, never copied or freed by flatshard.

use crate::dtype::DType;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl Device {
    pub fn describe(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

/// A contiguous tensor in memory the caller owns (the C `flatshard_tensor`).
/// `grad` is null when the tensor has no gradient.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef {
    pub data: *mut u8,
    pub grad: *mut u8,
    pub numel: u64,
    pub dtype: DType,
    pub device: Device,
}

impl TensorRef {
    pub fn bytes(&self) -> Result<usize> {
        self.dtype.bytes(self.numel, "tensor numel")
    }
    /// Check the pointers a CPU tensor needs; `what` names it in errors.
    pub fn check_host(&self, what: &str) -> Result<()> {
        if self.device != Device::Cpu {
            return Err(Error::unsupported(format!(
                "{what}: {} tensors need the CUDA build with a driver; this path takes host memory",
                self.device.describe()
            )));
        }
        if self.numel > 0 && self.data.is_null() {
            return Err(Error::invalid_arg(format!("{what}: data is NULL but numel is {}", self.numel)));
        }
        self.bytes().map_err(|e| e.context(what))?;
        Ok(())
    }
}

impl TensorRef {
    /// Describe a host byte buffer as a tensor of `dtype` (no grad).
    pub fn host(buf: &mut [u8], dtype: DType) -> TensorRef {
        TensorRef { data: buf.as_mut_ptr(), grad: std::ptr::null_mut(), numel: (buf.len() / dtype.size()) as u64, dtype, device: Device::Cpu }
    }
}
