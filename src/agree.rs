//! The one cross-rank agreement step. Before a collective call moves any data
//! (`flat_param_new`, `average_parameters`), every rank contributes a small
//! descriptor of named fields (or a refusal, when its own arguments were
//! invalid); the ranks all-gather the descriptors and compare them, so one
//! rank's bad or different input becomes an error on every rank, with the
//! same message naming which ranks differ in which field, instead of a hang
//! or garbage. (The collectives themselves compare their `wire::OpDesc`
//! header inside each transport, which carries the data in the same frame.)
//!
//! Variable-length inputs (every tensor's numel) go in as one [`fingerprint`]
//! field.

use crate::comm::Comm;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// One field of a descriptor: its name in messages, and its value.
pub type Field = (&'static str, u64);

/// FNV-1a over `values`: a field standing for a variable-length input.
pub fn fingerprint(values: impl IntoIterator<Item = u64>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Agree on `mine` (`Err(())` = this rank refused its own arguments and will
/// report its own error) over `comm`. Every rank must pass the same number of
/// fields, `n_fields`, with the same names. Returns Ok when every rank sent
/// the same values; MISMATCH otherwise, naming the ranks that refused or the
/// fields and the ranks whose values differ from rank 0's. A refusing rank
/// gets Ok back (its own error is what it reports).
pub fn agree(comm: &Comm, what: &str, n_fields: usize, mine: std::result::Result<&[Field], ()>) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.size());
    let words = 1 + n_fields;
    let mut send = vec![0u64; words];
    let mut names: Vec<&'static str> = Vec::new();
    if let Ok(fields) = mine {
        if fields.len() != n_fields {
            return Err(Error::internal(format!("agreement on {what}: {} fields, expected {n_fields}", fields.len())));
        }
        send[0] = 1;
        for (i, (name, v)) in fields.iter().enumerate() {
            send[1 + i] = *v;
            names.push(name);
        }
    }
    if world == 1 {
        return Ok(());
    }
    let bytes: Vec<u8> = send.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut recv = vec![0u8; bytes.len() * world];
    // Through the memory layer, so an NCCL communicator agrees too.
    crate::mem::collective(comm, |ops| ops.all_gather_host(comm, &bytes, &mut recv, DType::U8))?;
    let all: Vec<Vec<u64>> =
        recv.chunks_exact(8 * words).map(|b| b.chunks_exact(8).map(|x| u64::from_le_bytes(x.try_into().expect("8 bytes"))).collect()).collect();
    if mine.is_err() {
        return Ok(());
    }
    let refused: Vec<usize> = (0..world).filter(|&r| all[r][0] == 0).collect();
    if !refused.is_empty() {
        let who = match refused.as_slice() {
            [one] => format!("rank {one} refused its arguments (see its error)"),
            many => format!("ranks {many:?} refused their arguments (see their errors)"),
        };
        return Err(Error::mismatch(format!("rank {rank}: {what}: {who}; nothing was done")));
    }
    let mut diffs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let differ: Vec<String> = (1..world).filter(|&r| all[r][1 + i] != all[0][1 + i]).map(|r| format!("rank {r}: {}", all[r][1 + i])).collect();
        if !differ.is_empty() {
            diffs.push(format!("{name} (rank 0: {}, {})", all[0][1 + i], differ.join(", ")));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::mismatch(format!("rank {rank}: {what}: the ranks passed different {}; nothing was done", diffs.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_fnv1a_over_little_endian_words() {
        assert_eq!(fingerprint([]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fingerprint([1, 2]), fingerprint([2, 1]));
        assert_eq!(fingerprint([7, 9]), fingerprint(vec![7, 9]));
    }
}
