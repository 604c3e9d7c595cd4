//! The wire format of a collective's header: what every rank sends before the
//! data so the peers can check they are running the same call, and a
//! sequence number so a frame from an earlier (failed or skipped) call is
//! never taken for this one.

use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};

/// The kinds of collective, as they travel in headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Barrier = 5,
}

/// What one collective call is. Every rank must call with the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpDesc {
    pub kind: OpKind,
    pub count: u64,
    pub dt: DType,
    pub op: ReduceOp,
    pub root: i32,
}

impl OpDesc {
    pub fn new(kind: OpKind, count: u64, dt: DType, op: ReduceOp, root: i32) -> Self {
        OpDesc { kind, count, dt, op, root }
    }
    pub fn describe(&self) -> String {
        let mut s = format!("{:?}(count {}, {}", self.kind, self.count, self.dt.name());
        if matches!(self.kind, OpKind::AllReduce | OpKind::ReduceScatter) {
            s += &format!(", {}", self.op.name());
        }
        if self.kind == OpKind::Broadcast {
            s += &format!(", root {}", self.root);
        }
        s + ")"
    }
    /// 32-byte wire header: magic, seq, kind, dtype, op, 0, root, count, payload length.
    pub fn encode(&self, seq: u32, payload: u64) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(b"FSOP");
        h[4..8].copy_from_slice(&seq.to_le_bytes());
        h[8] = self.kind as u8;
        h[9] = self.dt as u8;
        h[10] = self.op as u8;
        h[12..16].copy_from_slice(&self.root.to_le_bytes());
        h[16..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..32].copy_from_slice(&payload.to_le_bytes());
        h
    }
    pub fn decode(h: &[u8; 32]) -> Result<(OpDesc, u64)> {
        if &h[0..4] != b"FSOP" {
            return Err(Error::peer_lost("sent a frame that is not a flatshard header (stream out of step)"));
        }
        let kind = match h[8] {
            1 => OpKind::AllReduce,
            2 => OpKind::AllGather,
            3 => OpKind::ReduceScatter,
            4 => OpKind::Broadcast,
            5 => OpKind::Barrier,
            k => return Err(Error::peer_lost(format!("sent unknown collective kind {k}"))),
        };
        let dt = DType::from_raw(h[9] as i64, "header dtype").map_err(|e| Error::peer_lost(e.msg))?;
        let op = ReduceOp::from_raw(h[10] as i64, "header op").map_err(|e| Error::peer_lost(e.msg))?;
        let root = i32::from_le_bytes(h[12..16].try_into().expect("4"));
        let count = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        let payload = u64::from_le_bytes(h[24..32].try_into().expect("8"));
        Ok((OpDesc { kind, count, dt, op, root }, payload))
    }

    /// The sequence number a header carries.
    pub fn seq_of(h: &[u8; 32]) -> u32 {
        u32::from_le_bytes([h[4], h[5], h[6], h[7]])
    }

    /// Decode a peer's header for call number `seq` of this group: a header
    /// of another call (a late frame of an earlier, failed call, or a peer
    /// that skipped one) is PEER_LOST, never taken for this call's data.
    pub fn decode_in_step(h: &[u8; 32], seq: u32) -> Result<(OpDesc, u64)> {
        let d = OpDesc::decode(h)?;
        let theirs = OpDesc::seq_of(h);
        if theirs != seq {
            return Err(Error::peer_lost(format!("is out of step: its frame belongs to call #{theirs} of the group, this rank is at call #{seq}")));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn header_round_trip_and_checks() {
        let d = OpDesc::new(OpKind::Broadcast, 1 << 40, DType::BF16, ReduceOp::Max, 3);
        let h = d.encode(77, 12345);
        assert_eq!(OpDesc::decode_in_step(&h, 77).unwrap(), (d, 12345));
        let e = OpDesc::decode_in_step(&h, 78).unwrap_err();
        assert!(e.kind == ErrorKind::PeerLost && e.msg.contains("call #77") && e.msg.contains("call #78"), "{}", e.msg);
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(OpDesc::decode(&bad).unwrap_err().kind, ErrorKind::PeerLost);
        for (i, v) in [(8, 9u8), (9, 200), (10, 200)] {
            let mut b = h;
            b[i] = v;
            assert_eq!(OpDesc::decode(&b).unwrap_err().kind, ErrorKind::PeerLost, "byte {i} = {v}");
        }
        assert!(d.describe().contains("root 3"));
    }
}
