//! Pure geometry of sharded tensors (SPEC §4): a rank's contiguous range of a
//! param's row-major elements as N-d boxes, and a saved box as the contiguous
//! runs it covers in the full tensor.

/// An N-d box of a tensor, and where its elements start in the range that
/// was decomposed (its elements are contiguous there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    /// Row-major index (in the full tensor) of the box's first element.
    pub start: u64,
    pub numel: u64,
}

/// Split the row-major element range `[lo, hi)` of a tensor of `shape` into
/// boxes: the partial first row, the whole rows, the partial last row, each
/// partial row split the same way one dimension down. At most `2·ndim − 1`
/// pieces, in element order, empty pieces skipped. Each piece's elements are
/// contiguous in row-major order (`start .. start + numel`).
pub fn decompose(shape: &[u64], lo: u64, hi: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    if lo < hi {
        split(shape, lo, hi, &mut Vec::new(), 0, &mut out);
    }
    out
}

fn split(shape: &[u64], lo: u64, hi: u64, prefix: &mut Vec<u64>, base: u64, out: &mut Vec<Piece>) {
    let d = prefix.len();
    let rest = &shape[d..];
    if rest.is_empty() {
        // a scalar (0-d tensor): its one element
        out.push(Piece { offsets: vec![], sizes: vec![], start: base, numel: 1 });
        return;
    }
    let row: u64 = rest[1..].iter().product();
    let piece = |offsets: Vec<u64>, sizes: Vec<u64>, start: u64| {
        let numel = sizes.iter().product();
        Piece { offsets, sizes, start, numel }
    };
    let sub = |prefix: &mut Vec<u64>, r: u64, a: u64, b: u64, out: &mut Vec<Piece>| {
        prefix.push(r);
        split(shape, a, b, prefix, base + r * row, out);
        prefix.pop();
    };
    if rest.len() == 1 {
        let mut offs = prefix.clone();
        offs.push(lo);
        let mut sizes = vec![1; d];
        sizes.push(hi - lo);
        out.push(piece(offs, sizes, base + lo));
        return;
    }
    let (r0, r1) = (lo / row, hi / row);
    if r0 == r1 {
        sub(prefix, r0, lo - r0 * row, hi - r0 * row, out);
        return;
    }
    let mut first_full = r0;
    if !lo.is_multiple_of(row) {
        sub(prefix, r0, lo - r0 * row, row, out);
        first_full = r0 + 1;
    }
    if first_full < r1 {
        let mut offs = prefix.clone();
        offs.push(first_full);
        offs.extend(std::iter::repeat_n(0, rest.len() - 1));
        let mut sizes = vec![1; d];
        sizes.push(r1 - first_full);
        sizes.extend_from_slice(&rest[1..]);
        out.push(piece(offs, sizes, base + first_full * row));
    }
    if !hi.is_multiple_of(row) {
        sub(prefix, r1, 0, hi - r1 * row, out);
    }
}

/// A box of a tensor as contiguous runs of the full tensor's row-major
/// order: `f(tensor_index, box_index, len)` for each run in order, where
/// `box_index` counts elements in the box's own row-major storage.
/// The caller has checked `offsets[d] + sizes[d] <= shape[d]`.
pub fn for_each_run(shape: &[u64], offsets: &[u64], sizes: &[u64], mut f: impl FnMut(u64, u64, u64)) {
    let nd = shape.len();
    if sizes.contains(&0) {
        return;
    }
    if nd == 0 {
        f(0, 0, 1);
        return;
    }
    let mut strides = vec![1u64; nd];
    for d in (0..nd - 1).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    // j: the outermost dim such that every dim after it is whole.
    let mut j = nd - 1;
    while j > 0 && sizes[j] == shape[j] {
        j -= 1;
    }
    let run = sizes[j] * strides[j];
    let mut idx = vec![0u64; j]; // odometer over dims < j
    let mut b = 0u64;
    loop {
        let t: u64 = (0..j).map(|d| (offsets[d] + idx[d]) * strides[d]).sum::<u64>() + offsets[j] * strides[j];
        f(t, b, run);
        b += run;
        let mut d = j;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of [lo, hi) is in exactly one piece, pieces are boxes
    /// of the stated size whose row-major elements are start..start+numel.
    fn check(shape: &[u64], lo: u64, hi: u64) {
        let ps = decompose(shape, lo, hi);
        assert!(ps.len() < (2 * shape.len()).max(2), "{shape:?} [{lo},{hi}): {} pieces", ps.len());
        let mut at = lo;
        for p in &ps {
            assert!(p.numel > 0);
            assert_eq!(p.start, at, "{shape:?} [{lo},{hi}) {ps:?}");
            let mut seen = Vec::new();
            for_each_run(shape, &p.offsets, &p.sizes, |t, b, n| {
                assert_eq!(b, seen.len() as u64);
                seen.extend(t..t + n);
            });
            assert_eq!(seen, (p.start..p.start + p.numel).collect::<Vec<_>>(), "{shape:?} {p:?}");
            at += p.numel;
        }
        assert_eq!(at, hi.max(lo));
    }

    #[test]
    fn decomposition_covers_exactly() {
        for shape in [vec![7u64], vec![3, 5], vec![2, 3, 4], vec![3, 1, 2, 5], vec![1, 1, 1], vec![4, 1]] {
            let n: u64 = shape.iter().product();
            for lo in 0..=n {
                for hi in lo..=n {
                    check(&shape, lo, hi);
                }
            }
        }
        check(&[], 0, 1);
    }

    #[test]
    fn spec_example_boxes() {
        // shape [4, 5], elements 3..17: row 0 cols 3..5, rows 1..3, row 3 cols 0..2
        let ps = decompose(&[4, 5], 3, 17);
        let boxes: Vec<(Vec<u64>, Vec<u64>)> = ps.iter().map(|p| (p.offsets.clone(), p.sizes.clone())).collect();
        assert_eq!(boxes, vec![(vec![0, 3], vec![1, 2]), (vec![1, 0], vec![2, 5]), (vec![3, 0], vec![1, 2])]);
        // 3-D with a boundary inside a row of a slab: at most 5 boxes
        let ps = decompose(&[3, 4, 5], 7, 52);
        assert_eq!(ps.len(), 5);
        assert_eq!((ps[0].offsets.clone(), ps[0].sizes.clone()), (vec![0, 1, 2], vec![1, 1, 3]));
        assert_eq!((ps[2].offsets.clone(), ps[2].sizes.clone()), (vec![1, 0, 0], vec![1, 4, 5]));
    }

    #[test]
    fn runs_of_column_boxes() {
        // a column block of a 3x4 matrix: rows 0..3, cols 1..3 → 3 runs of 2
        let mut runs = Vec::new();
        for_each_run(&[3, 4], &[0, 1], &[3, 2], |t, b, n| runs.push((t, b, n)));
        assert_eq!(runs, vec![(1, 0, 2), (5, 2, 2), (9, 4, 2)]);
    }
}
