//! Job-token handshake for every connection (rendezvous and data).
//!
//! Mutual HMAC-SHA256 challenge–response; the token never crosses the wire and
//! each side's nonce is fresh, so a recorded handshake cannot be replayed.
//!
//! ```text
//! server → client: "FSHS" | version u32 | nonce_s[32]
//! client → server: "FSHC" | nonce_c[32] | ident_len u16 | ident | mac_c[32]
//!                  mac_c = HMAC(token, "flatshard-client" | nonce_s | nonce_c | ident)
//! server → client: verdict u8 | mac_s[32]
//!                  mac_s = HMAC(token, "flatshard-server" | nonce_c | nonce_s | ident)
//! ```
//! `ident` says what the connection is for ("store", "data <group> <rank>"); the
//! server's `judge` refuses identities it does not expect (duplicate rank, other
//! group). Lengths are checked before anything is allocated.

use super::net::{self, Wait};
use crate::error::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::TcpStream;

const VERSION: u32 = 1;
pub(crate) const MAX_IDENT: usize = 256;

pub(crate) const VERDICT_OK: u8 = 0;
pub(crate) const VERDICT_BAD_TOKEN: u8 = 1;
pub(crate) const VERDICT_REFUSED: u8 = 2;

fn mac(key: &[u8], label: &[u8], a: &[u8], b: &[u8], ident: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(a);
    m.update(b);
    m.update(&(ident.len() as u16).to_le_bytes());
    m.update(ident);
    m.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side. Returns the client's identity once it proved the token and
/// `judge` accepted it; on failure the connection is answered and dropped.
pub fn serve(s: &mut TcpStream, key: &[u8], w: &Wait, judge: &mut dyn FnMut(&str) -> bool) -> Result<String> {
    let mut nonce_s = [0u8; 32];
    net::random_bytes(&mut nonce_s)?;
    let mut hello = Vec::with_capacity(40);
    hello.extend_from_slice(b"FSHS");
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&nonce_s);
    net::write_all(s, &hello, w, "connecting peer")?;

    let mut head = [0u8; 4 + 32 + 2];
    net::read_exact(s, &mut head, w, "connecting peer")?;
    if &head[0..4] != b"FSHC" {
        return Err(Error::auth("handshake: connecting peer did not speak the flatshard protocol"));
    }
    let nonce_c: [u8; 32] = head[4..36].try_into().expect("32 bytes");
    let ident_len = u16::from_le_bytes([head[36], head[37]]) as usize;
    if ident_len > MAX_IDENT {
        return Err(Error::auth(format!("handshake: identity length {ident_len} exceeds {MAX_IDENT}")));
    }
    let mut rest = vec![0u8; ident_len + 32];
    net::read_exact(s, &mut rest, w, "connecting peer")?;
    let (ident, mac_c) = rest.split_at(ident_len);
    let want = mac(key, b"flatshard-client", &nonce_s, &nonce_c, ident);
    let ident_str = String::from_utf8_lossy(ident).into_owned();
    let verdict = if !ct_eq(&want, mac_c) {
        VERDICT_BAD_TOKEN
    } else if !judge(&ident_str) {
        VERDICT_REFUSED
    } else {
        VERDICT_OK
    };
    let mut reply = [0u8; 33];
    reply[0] = verdict;
    if verdict == VERDICT_OK {
        reply[1..].copy_from_slice(&mac(key, b"flatshard-server", &nonce_c, &nonce_s, ident));
    }
    net::write_all(s, &reply, w, "connecting peer")?;
    match verdict {
        VERDICT_OK => Ok(ident_str),
        VERDICT_BAD_TOKEN => Err(Error::auth(format!("handshake: '{ident_str}' failed the job-token check"))),
        _ => Err(Error::auth(format!("handshake: '{ident_str}' was not expected (duplicate or foreign)"))),
    }
}

/// Client side: prove the token, check the server knows it too.
pub fn connect(s: &mut TcpStream, key: &[u8], ident: &str, w: &Wait, peer: &str) -> Result<()> {
    if ident.len() > MAX_IDENT {
        return Err(Error::internal(format!("handshake identity longer than {MAX_IDENT}")));
    }
    let mut hello = [0u8; 40];
    net::read_exact(s, &mut hello, w, peer)?;
    if &hello[0..4] != b"FSHS" {
        return Err(Error::auth(format!("handshake: {peer} is not a flatshard endpoint")));
    }
    let ver = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    if ver != VERSION {
        return Err(Error::mismatch(format!("handshake: {peer} speaks protocol {ver}, this library {VERSION}")));
    }
    let nonce_s = &hello[8..40];
    let mut nonce_c = [0u8; 32];
    net::random_bytes(&mut nonce_c)?;
    let mut msg = Vec::with_capacity(4 + 32 + 2 + ident.len() + 32);
    msg.extend_from_slice(b"FSHC");
    msg.extend_from_slice(&nonce_c);
    msg.extend_from_slice(&(ident.len() as u16).to_le_bytes());
    msg.extend_from_slice(ident.as_bytes());
    msg.extend_from_slice(&mac(key, b"flatshard-client", nonce_s, &nonce_c, ident.as_bytes()));
    net::write_all(s, &msg, w, peer)?;
    let mut reply = [0u8; 33];
    net::read_exact(s, &mut reply, w, peer)?;
    match reply[0] {
        VERDICT_OK => {}
        VERDICT_BAD_TOKEN => {
            return Err(Error::auth(format!("{peer} refused this process's job token (set the same FLATSHARD_TOKEN / options.token on every rank)")))
        }
        _ => return Err(Error::auth(format!("{peer} refused '{ident}' (duplicate rank or a different job)"))),
    }
    let want = mac(key, b"flatshard-server", &nonce_c, nonce_s, ident.as_bytes());
    if !ct_eq(&want, &reply[1..]) {
        return Err(Error::auth(format!("{peer} does not know the job token")));
    }
    Ok(())
}
