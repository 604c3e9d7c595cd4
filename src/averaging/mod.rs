//! Model averaging for local SGD. See SPEC.md §1.
//!
//! - [`average`]: `average_parameters`, in place through a bounded bucket.
//! - [`schedule`]: PyTorch's periodic and hierarchical schedules and checks (pure).
//! - [`averager`]: the averagers (step counter + schedule + communicators).

pub mod average;
pub mod averager;
pub mod schedule;

pub use average::{average_parameters, average_parameters_with, AvgOptions, AVG_ONLY_WITH_GRAD, BUCKET_ENV, DEFAULT_BUCKET_BYTES};
pub use averager::Averager;
