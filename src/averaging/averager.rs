//! Periodic and hierarchical model averagers (PyTorch's `PeriodicModelAverager`
//! and `HierarchicalModelAverager`): a step counter, a schedule, and the
//! communicators to average over.

use super::schedule::{check_hierarchical, check_periodic, hierarchical_due, periodic_due, PERIOD_ONE_WARNING};
use super::{average_parameters, validate};
use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::tensor::TensorRef;
use std::sync::Arc;

/// Which communicator a level averages over.
enum Group {
    /// The averager's own communicator (group size == its size).
    Whole,
    /// Index into `Averager::subgroups`.
    Sub(usize),
}

struct Level {
    period: u64,
    group: Group,
}

enum Schedule {
    Periodic { period: u64 },
    Hierarchical { levels: Vec<Level> },
}

/// A model averager over `comm`. It shares `comm` (the communicator lives as
/// long as its last user) and owns the subgroups it created.
pub struct Averager {
    comm: Arc<Comm>,
    subgroups: Vec<Comm>,
    schedule: Schedule,
    warmup: u64,
    step: u64,
}

impl Averager {
    /// Average over all of `comm` every `period` steps once `step >= warmup`.
    /// Not collective. Period 1 logs a warning (an all-reduce of the gradients
    /// is cheaper).
    pub fn periodic(comm: Arc<Comm>, period: u64, warmup_steps: u64) -> Result<Averager> {
        let rank = comm.rank();
        if check_periodic(period).map_err(|e| e.context(format!("rank {rank}")))? {
            crate::log::warn(rank, PERIOD_ONE_WARNING);
        }
        Ok(Averager { comm, subgroups: Vec::new(), schedule: Schedule::Periodic { period }, warmup: warmup_steps, step: 0 })
    }

    /// `periods[i]` → `group_sizes[i]`, in the order given (PyTorch's dict
    /// order). Collective over `comm`: creates the subgroups (contiguous blocks
    /// of ranks, once per distinct size); the size equal to `comm`'s reuses it.
    pub fn hierarchical(comm: Arc<Comm>, periods: &[u64], group_sizes: &[i32], warmup_steps: u64) -> Result<Averager> {
        let (rank, world) = (comm.rank(), comm.size());
        if check_hierarchical(periods, group_sizes, world).map_err(|e| e.context(format!("rank {rank}")))? {
            crate::log::warn(rank, PERIOD_ONE_WARNING);
        }
        let mut subgroups: Vec<Comm> = Vec::new();
        let mut sizes: Vec<usize> = Vec::new();
        let mut levels = Vec::with_capacity(periods.len());
        for (&period, &g) in periods.iter().zip(group_sizes) {
            let g = g as usize;
            let group = if g == world {
                Group::Whole
            } else if let Some(k) = sizes.iter().position(|&s| s == g) {
                Group::Sub(k)
            } else {
                let sub = comm.new_subgroups(g as i32).map_err(|e| e.context(format!("rank {rank}: creating the subgroups of {g} ranks")))?;
                subgroups.push(sub);
                sizes.push(g);
                Group::Sub(subgroups.len() - 1)
            };
            crate::log::info(rank, &format!("averaging hierarchy: groups of {g} ranks average every {period} steps, if no higher level does"));
            levels.push(Level { period, group });
        }
        Ok(Averager { comm, subgroups, schedule: Schedule::Hierarchical { levels }, warmup: warmup_steps, step: 0 })
    }

    /// This rank in the averager's communicator.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The step the next call to `step` will run (0 for a new averager).
    pub fn current_step(&self) -> u64 {
        self.step
    }

    /// Resume a schedule from a checkpoint.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The group that averages at the current step, if any.
    fn due(&self) -> Option<&Comm> {
        match &self.schedule {
            Schedule::Periodic { period } => periodic_due(self.step, *period, self.warmup).then_some(&*self.comm),
            Schedule::Hierarchical { levels } => {
                let periods: Vec<u64> = levels.iter().map(|l| l.period).collect();
                hierarchical_due(self.step, &periods, self.warmup).map(|i| match levels[i].group {
                    Group::Whole => &*self.comm,
                    Group::Sub(k) => &self.subgroups[k],
                })
            }
        }
    }

    /// One optimizer step: average `params` if the schedule says so, then
    /// `step += 1`. Returns the size of the group that averaged (0 = none).
    /// Arguments are checked on every step; the "nothing to average" errors only
    /// on steps that average (as in PyTorch). On an error the step is not counted.
    ///
    /// # Safety
    /// As for [`average_parameters`].
    pub unsafe fn step(&mut self, params: &[TensorRef], flags: u32) -> Result<usize> {
        let rank = self.comm.rank();
        let next = self
            .step
            .checked_add(1)
            .ok_or_else(|| Error::invalid_state(format!("rank {rank}: the step counter is at its maximum {}; set_step to resume", u64::MAX)))?;
        let mut averaged = 0;
        if let Some(group) = self.due() {
            // checks the arguments collectively (see `average_parameters`)
            // SAFETY: our contract is average_parameters' (the tensors' memory is
            // valid and ours for the call), which our caller upholds.
            unsafe { average_parameters(group, params, flags)? };
            averaged = group.size();
        } else {
            validate(rank, params, flags)?;
        }
        self.step = next;
        Ok(averaged)
    }
}
