//! The averaging schedules of PyTorch's `PeriodicModelAverager` and
//! `HierarchicalModelAverager`, and their argument checks, as pure functions
//! (SPEC.md §1; the tests below are its worked examples).

use crate::error::{Error, Result};

/// Logged (WARN) when the largest period is 1.
pub const PERIOD_ONE_WARNING: &str = "period 1 averages the parameters after every step: an all-reduce of the gradients \
     (plain data parallelism) costs no more and needs no averager";

/// Periodic averager: average iff `step >= warmup && (step - warmup) % period == 0`.
pub fn periodic_due(step: u64, period: u64, warmup: u64) -> bool {
    period > 0 && step >= warmup && (step - warmup).is_multiple_of(period)
}

/// Hierarchical averager: once `step >= warmup`, the index of the first period
/// that divides the absolute `step`, scanning from the last given to the first
/// (PyTorch's `reversed(self._periods)`); `None` = no averaging this step.
pub fn hierarchical_due(step: u64, periods: &[u64], warmup: u64) -> Option<usize> {
    if step < warmup {
        return None;
    }
    (0..periods.len()).rev().find(|&i| periods[i] > 0 && step.is_multiple_of(periods[i]))
}

/// Check a periodic averager's period; `Ok(true)` = log the period-1 warning.
pub fn check_periodic(period: u64) -> Result<bool> {
    if period == 0 {
        return Err(Error::invalid_arg("period must be a positive value, got 0"));
    }
    Ok(period == 1)
}

/// Check a hierarchy against a communicator of `world` ranks, in SPEC order:
/// n ≥ 1; every period > 0; every group size > 0; the last group size equals
/// `world`; every group size divides `world`; then (flatshard's addition, since
/// PyTorch's dict keys cannot repeat) no period given twice.
/// `Ok(true)` = the largest period is 1: log the warning.
pub fn check_hierarchical(periods: &[u64], group_sizes: &[i32], world: usize) -> Result<bool> {
    let n = periods.len();
    if n == 0 || group_sizes.len() != n {
        return Err(Error::invalid_arg(format!(
            "n: the hierarchy is empty (n = {n}); give at least one period with its group size, the last one the size of comm ({world})"
        )));
    }
    if let Some(i) = periods.iter().position(|&p| p == 0) {
        return Err(Error::invalid_arg(format!("periods[{i}] is 0: every period must be a positive value")));
    }
    if let Some(i) = group_sizes.iter().position(|&g| g <= 0) {
        return Err(Error::invalid_arg(format!("group_sizes[{i}] is {}: every group size must be positive", group_sizes[i])));
    }
    let last = group_sizes[n - 1];
    if last as usize != world {
        return Err(Error::invalid_arg(format!(
            "group_sizes[{}] is {last}: the last group size must equal the size of comm, {world} (the top of the hierarchy averages over the whole communicator)",
            n - 1
        )));
    }
    for (i, &g) in group_sizes.iter().enumerate() {
        if !world.is_multiple_of(g as usize) {
            return Err(Error::invalid_arg(format!("group_sizes[{i}]: world size {world} must be divisible by group size {g}")));
        }
    }
    for j in 1..n {
        if let Some(i) = periods[..j].iter().position(|&p| p == periods[j]) {
            return Err(Error::invalid_arg(format!(
                "periods[{j}] is {}, the same as periods[{i}]: each period may appear once (PyTorch's dict keys are unique)",
                periods[j]
            )));
        }
    }
    Ok(periods.iter().max() == Some(&1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due_steps(steps: u64, f: impl Fn(u64) -> bool) -> Vec<u64> {
        (0..steps).filter(|&s| f(s)).collect()
    }

    #[test]
    fn periodic_spec_examples() {
        assert_eq!(due_steps(20, |s| periodic_due(s, 4, 13)), vec![13, 17]);
        assert_eq!(due_steps(20, |s| periodic_due(s, 4, 0)), vec![0, 4, 8, 12, 16]);
        // PyTorch's test: period 4, warmup 12..=15 over 20 steps
        assert_eq!(due_steps(20, |s| periodic_due(s, 4, 12)), vec![12, 16]);
        assert_eq!(due_steps(20, |s| periodic_due(s, 4, 15)), vec![15, 19]);
        assert_eq!(due_steps(5, |s| periodic_due(s, 1, 2)), vec![2, 3, 4]);
    }

    /// SPEC §1, 4 ranks: the group size that averages at each step (0 = none).
    fn group_at(step: u64, periods: &[u64], sizes: &[i32], warmup: u64) -> i32 {
        hierarchical_due(step, periods, warmup).map_or(0, |i| sizes[i])
    }

    #[test]
    fn hierarchical_two_levels_warmup_3() {
        let (p, g) = ([2u64, 4], [2i32, 4]);
        let want: Vec<i32> = (0..25u64)
            .map(|s| match s {
                0..=3 => 0,
                s if s % 4 == 0 => 4,
                s if s % 2 == 0 => 2,
                _ => 0,
            })
            .collect();
        let got: Vec<i32> = (0..25).map(|s| group_at(s, &p, &g, 3)).collect();
        assert_eq!(got, want);
        // the SPEC's named steps
        for (s, size) in [(4, 4), (8, 4), (6, 2), (10, 2), (5, 0), (3, 0)] {
            assert_eq!(group_at(s, &p, &g, 3), size, "step {s}");
        }
    }

    #[test]
    fn hierarchical_three_levels_warmup_10() {
        let (p, g) = ([2u64, 4, 8], [2i32, 4, 4]);
        assert_eq!((16..25).map(|s| group_at(s, &p, &g, 10)).collect::<Vec<_>>(), vec![4, 0, 2, 0, 4, 0, 2, 0, 4]);
        for s in 0..25u64 {
            let want_level = if s < 10 {
                None
            } else if s % 8 == 0 {
                Some(2)
            } else if s % 4 == 0 {
                Some(1)
            } else if s % 2 == 0 {
                Some(0)
            } else {
                None
            };
            assert_eq!(hierarchical_due(s, &p, 10), want_level, "step {s}");
        }
        assert_eq!(due_steps(25, |s| hierarchical_due(s, &p, 10) == Some(2)), vec![16, 24]);
        assert_eq!(due_steps(25, |s| hierarchical_due(s, &p, 10) == Some(1)), vec![12, 20]);
        assert_eq!(due_steps(25, |s| hierarchical_due(s, &p, 10) == Some(0)), vec![10, 14, 18, 22]);
    }

    #[test]
    fn scan_is_in_given_order_not_sorted() {
        // periods given largest first: the last given (2) wins whenever it divides
        assert_eq!(hierarchical_due(8, &[4, 2], 0), Some(1));
    }

    #[test]
    fn validations_in_spec_order() {
        let e = |p: &[u64], g: &[i32], w: usize| check_hierarchical(p, g, w).unwrap_err().msg;
        assert!(e(&[], &[], 4).contains("n = 0"));
        // a zero period is reported before a bad group size
        assert_eq!(e(&[2, 0], &[0, 4], 4), "periods[1] is 0: every period must be a positive value");
        assert_eq!(e(&[2, 4], &[-1, 4], 4), "group_sizes[0] is -1: every group size must be positive");
        // last size before divisibility
        let m = e(&[2, 4], &[3, 2], 4);
        assert!(m.contains("group_sizes[1] is 2") && m.contains("size of comm, 4"), "{m}");
        assert_eq!(e(&[2, 4], &[3, 4], 4), "group_sizes[0]: world size 4 must be divisible by group size 3");
        assert!(e(&[2, 4], &[8, 4], 4).contains("world size 4 must be divisible by group size 8"));
        assert!(e(&[4, 4], &[2, 4], 4).contains("periods[1] is 4, the same as periods[0]"));
        assert_eq!(check_hierarchical(&[2, 4], &[2, 4], 4), Ok(false));
        assert_eq!(check_hierarchical(&[1], &[4], 4), Ok(true));
        assert_eq!(check_periodic(0).unwrap_err().msg, "period must be a positive value, got 0");
        assert_eq!(check_periodic(1), Ok(true));
        assert_eq!(check_periodic(4), Ok(false));
    }
}
