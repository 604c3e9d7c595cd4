//! Pure layout math of a flat parameter (SPEC.md §2): where each param sits in
//! the flat buffer, the padding, the chunk each rank owns, and shard views.
//! No I/O, no allocation beyond the offset table; table-tested with the SPEC's
//! worked examples.

use crate::error::{Error, Result};

/// Elements per 16-byte alignment unit for an element of `itemsize` bytes
/// (PyTorch `use_orig_params=True` aligns every param's start to 16 bytes).
pub fn align_elems(itemsize: usize) -> u64 {
    (16 / itemsize.max(1)).max(1) as u64
}

/// Ceiling division that never overflows for the sizes we accept.
fn ceil_div(a: u64, b: u64) -> u64 {
    a / b + u64::from(!a.is_multiple_of(b))
}

/// Where param `i`'s piece inside one rank's shard lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardView {
    /// First element of the piece, counted from the start of the shard.
    pub offset_in_shard: u64,
    /// First element of the piece, counted from the start of the param.
    pub offset_in_param: u64,
    /// Elements in the piece (0: the param does not reach this shard).
    pub numel: u64,
}

/// The flat layout of `numels` sharded over `world` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Param i occupies `[offsets[i], offsets[i] + numels[i])` of the flat layout.
    pub numels: Vec<u64>,
    pub offsets: Vec<u64>,
    /// L: the layout length (with alignment padding, if any).
    pub len: u64,
    /// Ranks the layout is sharded over (1 = unsharded).
    pub world: u64,
    /// c = ceil(L / world): every shard buffer has exactly c elements.
    pub chunk: u64,
}

impl Layout {
    /// `align`: `Some(a)` inserts padding so every param after the first
    /// starts at a multiple of `a` elements and pads the end to a multiple of
    /// `pad_world` (PyTorch pads to the process-group size even for NO_SHARD);
    /// `None` packs the params back to back. `world` is how many ranks share it.
    pub fn new(numels: &[u64], align: Option<u64>, pad_world: u64, world: u64) -> Result<Layout> {
        if numels.is_empty() {
            return Err(Error::invalid_arg("n_params: 0 params; a flat param needs at least one"));
        }
        if world == 0 || pad_world == 0 {
            return Err(Error::internal("layout: world size 0"));
        }
        let overflow = || Error::invalid_arg(format!("params: total numel of {} params overflows 2^63", numels.len()));
        let mut offsets = Vec::with_capacity(numels.len());
        let mut total: u64 = 0;
        for (i, &n) in numels.iter().enumerate() {
            if let Some(a) = align {
                if i > 0 && !total.is_multiple_of(a) {
                    total = total.checked_add(a - total % a).ok_or_else(overflow)?;
                }
            }
            offsets.push(total);
            total = total.checked_add(n).ok_or_else(overflow)?;
        }
        if align.is_some() && !total.is_multiple_of(pad_world) {
            total += pad_world - total % pad_world;
        }
        if total > i64::MAX as u64 / 16 {
            return Err(overflow());
        }
        let chunk = ceil_div(total, world);
        Ok(Layout { numels: numels.to_vec(), offsets, len: total, world, chunk })
    }

    /// Σ numel, without padding (`flat_param_numel`).
    pub fn numel(&self) -> u64 {
        self.numels.iter().sum()
    }

    /// c·W: the unsharded buffer (`flat_param_padded_numel`).
    pub fn padded_numel(&self) -> u64 {
        self.chunk * self.world
    }

    /// Layout indices rank `r` owns: `[c*r, min(c*(r+1), L))` (may be empty).
    pub fn rank_range(&self, r: u64) -> (u64, u64) {
        let lo = (self.chunk * r).min(self.len);
        let hi = (self.chunk * (r + 1)).min(self.len);
        (lo, hi)
    }

    /// Param `i`'s piece inside rank `r`'s shard.
    pub fn shard_view(&self, i: usize, r: u64) -> ShardView {
        let (s, e) = (self.offsets[i], self.offsets[i] + self.numels[i]);
        let (lo, hi) = (self.chunk * r, self.chunk * (r + 1));
        let (a, b) = (s.max(lo), e.min(hi));
        if a >= b {
            return ShardView { offset_in_shard: 0, offset_in_param: 0, numel: 0 };
        }
        ShardView { offset_in_shard: a - lo, offset_in_param: a - s, numel: b - a }
    }

    /// The pieces of real (non-padding) elements inside layout range
    /// `[lo, hi)`, as `(start, len)` in layout indices, in order.
    pub fn real_segments(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (i, &n) in self.numels.iter().enumerate() {
            let (s, e) = (self.offsets[i].max(lo), (self.offsets[i] + n).min(hi));
            if s < e {
                out.push((s, e - s));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_aligned_f32_two_ranks() {
        // Linear 3→7, 7→5, 5→5 without bias: 21 | pad 3 | 35 | pad 1 | 25 | pad 1
        let l = Layout::new(&[21, 35, 25], Some(align_elems(4)), 2, 2).unwrap();
        assert_eq!(l.offsets, vec![0, 24, 60]);
        assert_eq!((l.len, l.chunk, l.padded_numel(), l.numel()), (86, 43, 86, 81));
        assert_eq!(l.rank_range(0), (0, 43));
        assert_eq!(l.rank_range(1), (43, 86));
    }

    #[test]
    fn spec_aligned_half_two_ranks() {
        // bf16/f16 param_dtype: a = 8 → 21 | 3 | 35 | 5 | 25 | 1 = 90
        let l = Layout::new(&[21, 35, 25], Some(align_elems(2)), 2, 2).unwrap();
        assert_eq!(l.offsets, vec![0, 24, 64]);
        assert_eq!((l.len, l.chunk, l.padded_numel()), (90, 45, 90));
    }

    #[test]
    fn spec_unaligned_121_two_ranks() {
        // Linear 10→11 (110 weight + 11 bias), no alignment
        let l = Layout::new(&[110, 11], None, 2, 2).unwrap();
        assert_eq!((l.len, l.chunk, l.padded_numel()), (121, 61, 122));
        assert_eq!(l.rank_range(1), (61, 121)); // 60 real elements + 1 pad
        assert_eq!(l.real_segments(61, 121), vec![(61, 49), (110, 11)]);
    }

    #[test]
    fn spec_five_over_four() {
        let l = Layout::new(&[5], None, 4, 4).unwrap();
        assert_eq!((l.chunk, l.padded_numel()), (2, 8));
        assert_eq!(l.rank_range(2), (4, 5));
        assert_eq!(l.rank_range(3), (5, 5)); // rank 3 owns nothing
        assert_eq!(l.shard_view(0, 3).numel, 0);
    }

    #[test]
    fn shard_view_table() {
        // the 86/43 example: (param, rank) → (offset in shard, offset in param, numel)
        let l = Layout::new(&[21, 35, 25], Some(4), 2, 2).unwrap();
        let table = [(0, 0, (0, 0, 21)), (1, 0, (24, 0, 19)), (2, 0, (0, 0, 0)), (0, 1, (0, 0, 0)), (1, 1, (0, 19, 16)), (2, 1, (17, 0, 25))];
        for (i, r, (os, op, n)) in table {
            assert_eq!(l.shard_view(i, r), ShardView { offset_in_shard: os, offset_in_param: op, numel: n }, "param {i} rank {r}");
        }
        // the 121/61 example
        let l = Layout::new(&[110, 11], None, 2, 2).unwrap();
        assert_eq!(l.shard_view(0, 0), ShardView { offset_in_shard: 0, offset_in_param: 0, numel: 61 });
        assert_eq!(l.shard_view(0, 1), ShardView { offset_in_shard: 0, offset_in_param: 61, numel: 49 });
        assert_eq!(l.shard_view(1, 1), ShardView { offset_in_shard: 49, offset_in_param: 0, numel: 11 });
        assert_eq!(l.shard_view(1, 0).numel, 0);
    }

    #[test]
    fn no_shard_and_world_one() {
        // NO_SHARD on 2 ranks with alignment: padded to the group size, one chunk
        let l = Layout::new(&[21, 35, 25], Some(4), 2, 1).unwrap();
        assert_eq!((l.len, l.chunk, l.padded_numel()), (86, 86, 86));
        let l = Layout::new(&[3, 1], Some(4), 1, 1).unwrap();
        assert_eq!((l.offsets.clone(), l.len), (vec![0, 4], 5));
        assert!(Layout::new(&[], None, 1, 1).is_err());
    }

    #[test]
    fn odd_sizes_cover_every_element_once() {
        for w in 1..=5u64 {
            for numels in [vec![1u64], vec![7, 3], vec![13, 1, 2, 9]] {
                for align in [None, Some(4), Some(8)] {
                    let l = Layout::new(&numels, align, w, w).unwrap();
                    let mut seen = 0;
                    for r in 0..w {
                        for i in 0..numels.len() {
                            seen += l.shard_view(i, r).numel;
                        }
                    }
                    assert_eq!(seen, l.numel(), "w {w} {numels:?} {align:?}");
                    assert!(l.padded_numel() >= l.len && l.padded_numel() - l.len < w);
                }
            }
        }
    }
}
