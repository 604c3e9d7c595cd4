//! File system helpers for checkpoints: positioned reads and writes, fsync of
//! files and directories, the atomic directory swap. Every error is IO naming
//! the path. (Floating-point conversion of what is read: `crate::convert`.)

use crate::error::{Error, Result};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Bytes of the one I/O buffer a rank uses to convert dtypes and copy files.
pub(crate) const IO_BUF: usize = 8 << 20;

pub fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}: {e}", path.display()))
}

/// A new file (it must not exist), write-only.
pub fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o644).open(path).map_err(|e| io_err("cannot create", path, e))
}

pub fn open_read(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| io_err("cannot open", path, e))
}

pub fn pwrite_all(f: &File, buf: &[u8], off: u64, path: &Path) -> Result<()> {
    f.write_all_at(buf, off).map_err(|e| io_err(&format!("cannot write {} bytes at offset {off} of", buf.len()), path, e))
}

/// Read exactly `buf.len()` bytes at `off`; a short file is INVALID_ARGUMENT
/// (truncated), anything else IO.
pub fn pread_exact(f: &File, buf: &mut [u8], off: u64, path: &Path) -> Result<()> {
    f.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::invalid_arg(format!("{}: file ends before byte {} (truncated)", path.display(), off + buf.len() as u64))
        } else {
            io_err(&format!("cannot read {} bytes at offset {off} of", buf.len()), path, e)
        }
    })
}

pub fn fsync_path(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| io_err("cannot open for fsync", path, e))?;
    f.sync_all().map_err(|e| io_err("fsync failed on", path, e))
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::invalid_arg(format!("path {} contains a NUL byte", p.display())))
}

/// Make `tmp` visible as `dir`: `renameat2(RENAME_EXCHANGE)` when `dir`
/// exists (the old checkpoint then sits at `tmp`), `rename` when it does
/// not. Returns whether an old checkpoint now sits at `tmp`.
pub fn swap_into_place(tmp: &Path, dir: &Path) -> Result<bool> {
    let (a, b) = (cpath(tmp)?, cpath(dir)?);
    if std::fs::symlink_metadata(dir).is_ok() {
        // SAFETY: both paths are NUL-terminated C strings that live across
        // the call; renameat2 only reads them.
        let rc = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)) {
            return Err(io_err(&format!("renameat2(RENAME_EXCHANGE) of {} and", tmp.display()), dir, e));
        }
        // No exchange on this file system: move the old one aside first.
        // Between the two renames `dir` does not exist (the old checkpoint
        // is then at `<tmp>.old`, which the next save removes).
        let old = aside(tmp);
        std::fs::rename(dir, &old).map_err(|e| io_err("cannot move the old checkpoint aside:", dir, e))?;
        std::fs::rename(tmp, dir).map_err(|e| io_err(&format!("cannot rename {} to", tmp.display()), dir, e))?;
        std::fs::rename(&old, tmp).map_err(|e| io_err("cannot move the old checkpoint to", tmp, e))?;
        return Ok(true);
    }
    std::fs::rename(tmp, dir).map_err(|e| io_err(&format!("cannot rename {} to", tmp.display()), dir, e))?;
    Ok(false)
}

fn aside(tmp: &Path) -> std::path::PathBuf {
    let mut s = tmp.as_os_str().to_owned();
    s.push(".old");
    s.into()
}

#[cfg(test)]
mod tests {
    use crate::convert::convert_host as convert;
    use crate::dtype::DType;

    /// Checkpoint loads convert through `crate::convert`: f64 → bf16 / f16
    /// must round once (not through f32 to nearest first).
    #[test]
    fn conversion_rounds_to_nearest_even_once() {
        // 1 + 2^-8 + 2^-30 in f64: bf16 (8 significant bits) must round up;
        // through f32 first it would still round up, but 1 + 2^-8 exactly is
        // a tie that must go to even (1.0).
        let tie = 1.0f64 + 2f64.powi(-8);
        let above = tie + 2f64.powi(-40);
        let src: Vec<u8> = [tie, above].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut dst = vec![0u8; 4];
        convert(&src, DType::F64, &mut dst, DType::BF16);
        let got: Vec<f32> = dst.chunks(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect();
        assert_eq!(got, vec![1.0, 1.0 + 2f32.powi(-7)]);
        // f32 → f16 and back
        let src: Vec<u8> = [0.1f32, 65504.0, -2.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut h = vec![0u8; 6];
        convert(&src, DType::F32, &mut h, DType::F16);
        let mut back = vec![0u8; 12];
        convert(&h, DType::F16, &mut back, DType::F32);
        let b: Vec<f32> = back.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(b, vec![half::f16::from_f32(0.1).to_f32(), 65504.0, -2.5]);
    }
}
