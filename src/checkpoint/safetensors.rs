//! The safetensors file header (SPEC §4): strict encoding and parsing.
//!
//! A file is an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (possibly padded with trailing spaces), then the data section, which the
//! tensors tile exactly. This module only deals with the header bytes; the
//! data is read and written with positioned I/O elsewhere.
//!
//! Why not the `safetensors` crate: it parses from and serialises to whole
//! in-memory buffers (or a whole-file mmap), so it cannot place a shard's
//! boxes with positioned writes, and it brings serde + serde_json for a
//! header of three field kinds. The parser here is ~300 lines with a depth
//! and size limit, every check of the reference implementation (known dtype,
//! shape × itemsize = byte span, offsets sorted and contiguous from 0, the
//! data section ending exactly at the end of the file), plus ours (at most 8
//! dims, no path separators or control characters in names), and errors that
//! name the file and the field. The Python test suite checks it against the
//! reference implementation (safetensors in PyTorch's venv) in both
//! directions.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The reference implementation's limit on the header length.
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;
/// flatshard_param_info.ndim limit (API §8).
pub(crate) const MAX_NDIM: usize = 8;
/// Longest tensor name accepted.
pub(crate) const MAX_NAME_LEN: usize = 4096;
/// Nesting depth of JSON the header needs (object → entry → array).
const MAX_DEPTH: usize = 4;

/// One tensor in a header: `data_offsets` are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A parsed header, entries sorted by data offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub entries: Vec<Entry>,
    /// `__metadata__` (every value a string), in file order.
    pub metadata: Vec<(String, String)>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
}

impl Header {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

pub fn dtype_code(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::U8 => "U8",
    }
}

fn dtype_from_code(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// A tensor name is usable: 1..=4096 bytes, no control characters, no path
/// separators (names become JSON keys and, in tools, file names).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("the name is {} bytes long (limit {MAX_NAME_LEN})", name.len()));
    }
    if let Some(c) = name.chars().find(|c| *c == '/' || *c == '\\' || c.is_control()) {
        return Err(format!("name {:?} contains {:?} (no path separators or control characters)", name, c));
    }
    if name == "__metadata__" {
        return Err("\"__metadata__\" is reserved by the safetensors format".into());
    }
    Ok(())
}

/// Elements of `shape`, or None on overflow.
pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
}

// ------------------------------------------------------------------ encoding

pub fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_u64s(out: &mut String, v: &[u64]) {
    out.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&x.to_string());
    }
    out.push(']');
}

/// `{"name": {"saved_offsets": [...]}, ...}`: DCP_SHARDING_INFO's value.
pub fn sharding_info(boxes: &[(&str, &[u64])]) -> String {
    let mut s = String::from("{");
    for (i, (name, offs)) in boxes.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        json_string(&mut s, name);
        s.push_str(":{\"saved_offsets\":");
        json_u64s(&mut s, offs);
        s.push('}');
    }
    s.push('}');
    s
}

/// The complete file prefix: 8-byte length + JSON header padded with spaces
/// so the data section starts at a multiple of 8. `entries` must already tile
/// the data section in order (the caller computes the offsets).
pub fn encode(entries: &[Entry], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut h = String::from("{");
    if !metadata.is_empty() {
        h.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            json_string(&mut h, k);
            h.push(':');
            json_string(&mut h, v);
        }
        h.push('}');
    }
    for (i, e) in entries.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            h.push(',');
        }
        json_string(&mut h, &e.name);
        h.push_str(":{\"dtype\":\"");
        h.push_str(dtype_code(e.dtype));
        h.push_str("\",\"shape\":");
        json_u64s(&mut h, &e.shape);
        h.push_str(",\"data_offsets\":");
        json_u64s(&mut h, &[e.begin, e.end]);
        h.push('}');
    }
    h.push('}');
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut out = Vec::with_capacity(8 + h.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out
}

// ------------------------------------------------------------------- parsing

/// A JSON value, as much of JSON as a safetensors header uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// A non-negative integer that fits in u64.
    UInt(u64),
    /// Any other number (negative, fractional, exponent, too large).
    OtherNumber,
    Str(String),
    Array(Vec<Json>),
    /// Members in file order (duplicates are rejected while parsing).
    Object(Vec<(String, Json)>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn err(&self, what: &str) -> String {
        format!("invalid JSON at byte {} of the header: {what}", self.i)
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }
    fn value(&mut self, depth: usize) -> std::result::Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err(self.err(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        self.ws();
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut members: Vec<(String, Json)> = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    if members.iter().any(|(m, _)| *m == k) {
                        return Err(self.err(&format!("duplicate key {k:?}")));
                    }
                    self.ws();
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    members.push((k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Object(members));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(c) => Err(self.err(&format!("unexpected character {:?}", c as char))),
            None => Err(self.err("unexpected end")),
        }
    }
    fn word(&mut self, w: &str, v: Json) -> std::result::Result<Json, String> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            Err(self.err("unknown literal"))
        }
    }
    fn number(&mut self) -> std::result::Result<Json, String> {
        let start = self.i;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let digits = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        if self.i == digits {
            return Err(self.err("a number needs digits"));
        }
        if self.s[digits] == b'0' && self.i - digits > 1 {
            return Err(self.err("leading zeros"));
        }
        let mut integral = !neg;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let f = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.i == f {
                return Err(self.err("a fraction needs digits"));
            }
            integral = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            let f = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.i == f {
                return Err(self.err("an exponent needs digits"));
            }
            integral = false;
        }
        if !integral {
            return Ok(Json::OtherNumber);
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| self.err("number"))?;
        Ok(text.parse::<u64>().map(Json::UInt).unwrap_or(Json::OtherNumber))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.peek().is_some_and(|c| c != b'"' && c != b'\\' && c >= 0x20) {
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|_| self.err("a string is not valid UTF-8"))?);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if !self.s[self.i..].starts_with(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("bad surrogate pair"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            out.push(char::from_u32(cp).ok_or_else(|| self.err("bad \\u escape"))?);
                        }
                        _ => return Err(self.err("unknown escape")),
                    }
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("unterminated string")),
            }
        }
    }
    fn hex4(&mut self) -> std::result::Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).ok_or_else(|| self.err("short \\u escape"))?;
        let t = std::str::from_utf8(h).map_err(|_| self.err("bad \\u escape"))?;
        let v = u32::from_str_radix(t, 16).map_err(|_| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(v)
    }
}

/// Parse a JSON document (one value, then only whitespace).
pub fn parse_json(s: &[u8]) -> std::result::Result<Json, String> {
    let mut p = Parser { s, i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != s.len() {
        return Err(p.err("trailing characters after the JSON value"));
    }
    Ok(v)
}

/// Read the header length from the first 8 bytes and check it against the
/// file size. Returns n (the JSON's length).
pub fn header_len(prefix: &[u8; 8], file_len: u64, file: &str) -> Result<u64> {
    let n = u64::from_le_bytes(*prefix);
    if n > MAX_HEADER_LEN {
        return Err(Error::invalid_arg(format!(
            "{file}: header length field is {n} bytes, over the limit of {MAX_HEADER_LEN} (not a safetensors file, or corrupt)"
        )));
    }
    if n.saturating_add(8) > file_len {
        return Err(Error::invalid_arg(format!("{file}: header length field is {n} bytes but the file has only {file_len} bytes (truncated?)")));
    }
    Ok(n)
}

fn u64s(v: &Json, file: &str, field: &str) -> Result<Vec<u64>> {
    let bad = || Error::invalid_arg(format!("{file}: {field} must be an array of non-negative integers below 2^64"));
    match v {
        Json::Array(a) => a.iter().map(|x| if let Json::UInt(u) = x { Ok(*u) } else { Err(bad()) }).collect(),
        _ => Err(bad()),
    }
}

/// Parse and validate header JSON `json` of a file of `file_len` bytes.
/// `file` names the file in errors.
pub fn parse(json: &[u8], file_len: u64, file: &str) -> Result<Header> {
    let bad = |m: String| Error::invalid_arg(format!("{file}: {m}"));
    if json.first() != Some(&b'{') {
        return Err(bad("header does not start with '{' (not a safetensors file)".into()));
    }
    let root = parse_json(json).map_err(bad)?;
    let Json::Object(members) = root else { return Err(bad("header is not a JSON object".into())) };
    let data_start = 8 + json.len() as u64;
    let data_len = file_len - data_start;
    let mut metadata = Vec::new();
    let mut entries = Vec::new();
    for (name, v) in members {
        if name == "__metadata__" {
            let Json::Object(m) = v else { return Err(bad("__metadata__ is not an object".into())) };
            for (k, v) in m {
                match v {
                    Json::Str(s) => metadata.push((k, s)),
                    _ => return Err(bad(format!("__metadata__.{k} is not a string"))),
                }
            }
            continue;
        }
        check_name(&name).map_err(|m| bad(format!("tensor name: {m}")))?;
        let Json::Object(fields) = v else { return Err(bad(format!("tensor {name:?}: not an object"))) };
        let (mut dtype, mut shape, mut offs) = (None, None, None);
        for (k, v) in fields {
            match k.as_str() {
                "dtype" => {
                    let Json::Str(s) = &v else { return Err(bad(format!("tensor {name:?}: dtype is not a string"))) };
                    dtype = Some(
                        dtype_from_code(s).ok_or_else(|| bad(format!("tensor {name:?}: dtype {s:?} is not supported (F32, F64, F16, BF16, I32, I64, U8)")))?,
                    );
                }
                "shape" => shape = Some(u64s(&v, file, &format!("tensor {name:?}: shape"))?),
                "data_offsets" => offs = Some(u64s(&v, file, &format!("tensor {name:?}: data_offsets"))?),
                other => return Err(bad(format!("tensor {name:?}: unknown field {other:?}"))),
            }
        }
        let dtype = dtype.ok_or_else(|| bad(format!("tensor {name:?}: no dtype")))?;
        let shape = shape.ok_or_else(|| bad(format!("tensor {name:?}: no shape")))?;
        let offs = offs.ok_or_else(|| bad(format!("tensor {name:?}: no data_offsets")))?;
        if shape.len() > MAX_NDIM {
            return Err(bad(format!("tensor {name:?}: shape has {} dims (limit {MAX_NDIM})", shape.len())));
        }
        if offs.len() != 2 {
            return Err(bad(format!("tensor {name:?}: data_offsets has {} entries, not 2", offs.len())));
        }
        let (begin, end) = (offs[0], offs[1]);
        if begin > end {
            return Err(bad(format!("tensor {name:?}: data_offsets [{begin}, {end}] end before they begin")));
        }
        let nbytes = numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .ok_or_else(|| bad(format!("tensor {name:?}: shape {shape:?} of {} overflows 64 bits", dtype_code(dtype))))?;
        if end - begin != nbytes {
            return Err(bad(format!(
                "tensor {name:?}: data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of {} needs {nbytes}",
                end - begin,
                dtype_code(dtype)
            )));
        }
        if end > data_len {
            return Err(bad(format!("tensor {name:?}: data_offsets [{begin}, {end}] reach past the data section of {data_len} bytes (truncated file?)")));
        }
        entries.push(Entry { name, dtype, shape, begin, end });
    }
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut at = 0u64;
    for e in &entries {
        if e.begin != at {
            return Err(bad(format!(
                "tensor {:?}: data_offsets [{}, {}]: expected it to begin at {at} ({}); tensors must tile the data section",
                e.name,
                e.begin,
                e.end,
                if e.begin < at { "it overlaps the previous tensor" } else { "there is a gap" }
            )));
        }
        at = e.end;
    }
    if at != data_len {
        return Err(bad(format!("data section is {data_len} bytes but the tensors cover {at} (trailing bytes or truncated file)")));
    }
    Ok(Header { entries, metadata, data_start })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, dtype: DType, shape: &[u64], begin: u64) -> Entry {
        let n = numel(shape).unwrap() * dtype.size() as u64;
        Entry { name: name.into(), dtype, shape: shape.to_vec(), begin, end: begin + n }
    }

    fn roundtrip(entries: &[Entry], meta: &[(&str, &str)]) -> Header {
        let bytes = encode(entries, meta);
        let data_len = entries.last().map_or(0, |e| e.end);
        let n = header_len(bytes[..8].try_into().unwrap(), bytes.len() as u64 + data_len, "f").unwrap();
        assert_eq!(n as usize, bytes.len() - 8);
        assert!(bytes.len().is_multiple_of(8));
        parse(&bytes[8..], bytes.len() as u64 + data_len, "f").unwrap()
    }

    #[test]
    fn encode_parse_roundtrip() {
        let es = vec![entry("a.weight", DType::F32, &[3, 4], 0), entry("b \"q\" é", DType::BF16, &[5], 48), entry("s", DType::I64, &[], 58)];
        let info = sharding_info(&[("a.weight", &[0, 0]), ("b \"q\" é", &[7]), ("s", &[])]);
        let h = roundtrip(&es, &[("format", "pt"), ("DCP_SHARDING_INFO", &info)]);
        assert_eq!(h.entries, es);
        assert_eq!(h.meta("format"), Some("pt"));
        let Json::Object(m) = parse_json(h.meta("DCP_SHARDING_INFO").unwrap().as_bytes()).unwrap() else { panic!() };
        assert_eq!(m.len(), 3);
        assert_eq!(roundtrip(&[], &[]).entries, vec![]);
    }

    fn file(json: &str, data_len: u64) -> Result<Header> {
        parse(json.as_bytes(), 8 + json.len() as u64 + data_len, "t.safetensors")
    }

    #[test]
    fn hostile_headers_name_the_field() {
        let cases: &[(&str, u64, &str)] = &[
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 7, "past the data section"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 9, "trailing bytes"),
            (r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#, 8, "dtype \"Q7\""),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4, "needs 8"),
            (r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, 0, "overflows"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}}"#, 8, "non-negative integers"),
            (r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, 8, "shape must be"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12, "overlaps"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "gap"),
            (r#"{"../x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 4, "path separators"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{}}"#, 4, "duplicate key"),
            (r#"{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}}"#, 4, "9 dims"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#, 4, "end before"),
            (r#"{"__metadata__":{"k":1}}"#, 0, "__metadata__.k"),
            (r#"[1]"#, 0, "start with '{'"),
            (r#"{"a":[[[[[[1]]]]]]}"#, 0, "nested"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x"#, 4, "trailing characters"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#, 4, "unknown field"),
        ];
        for (json, dl, want) in cases {
            let e = file(json, *dl).expect_err(json);
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument);
            assert!(e.msg.contains("t.safetensors") && e.msg.contains(want), "{json}: {}", e.msg);
        }
        // a padded header and an empty tensor are fine
        let h = file(r#"{"a":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}}      "#, 0).unwrap();
        assert_eq!(h.entries[0].shape, vec![0, 3]);
        assert!(header_len(&(MAX_HEADER_LEN + 1).to_le_bytes(), u64::MAX, "f").unwrap_err().msg.contains("limit"));
        assert!(header_len(&100u64.to_le_bytes(), 50, "f").unwrap_err().msg.contains("truncated"));
    }

    /// Bounded fuzz: random mutations of a valid header never panic, and
    /// whatever is accepted satisfies the tiling invariants.
    #[test]
    fn fuzz_header_parser() {
        let es = vec![entry("w", DType::F32, &[3, 4], 0), entry("b", DType::F16, &[4], 48), entry("s", DType::I64, &[], 56)];
        let info = sharding_info(&[("w", &[0, 0]), ("b", &[4]), ("s", &[])]);
        let base = encode(&es, &[("format", "pt"), ("DCP_SHARDING_INFO", &info)]);
        let json = base[8..].to_vec();
        let data_len = 64u64;
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let alphabet = b"{}[]\":,0123456789-.eE \\u/abFIU";
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut j = json.clone();
            for _ in 0..1 + next() % 4 {
                let pos = (next() % j.len() as u64) as usize;
                match next() % 4 {
                    0 => j[pos] = alphabet[(next() % alphabet.len() as u64) as usize],
                    1 => j[pos] = next() as u8,
                    2 => {
                        j.remove(pos);
                    }
                    _ => j.insert(pos, alphabet[(next() % alphabet.len() as u64) as usize]),
                }
            }
            let flen = 8 + j.len() as u64 + data_len - (next() % 3);
            if let Ok(h) = parse(&j, flen, "fuzz") {
                accepted += 1;
                let mut at = 0;
                for e in &h.entries {
                    assert_eq!(e.begin, at);
                    assert_eq!(e.end - e.begin, numel(&e.shape).unwrap() * e.dtype.size() as u64);
                    at = e.end;
                }
                assert_eq!(at + h.data_start, flen);
            }
        }
        assert!(accepted > 0, "the fuzzer never produced a valid header (mutations too strong)");
    }
}
