//! Sharded checkpoints over real processes and files (API §8, SPEC §4):
//! save at 4 ranks, load at 4/3/1 ranks with other shardings, alignment,
//! HYBRID_SHARD and bf16; bytes read per rank; mismatched and invalid calls;
//! hostile files; ranks killed during saves; peak RSS of a 1 GiB save.
//! Expected values are computed here from the param index and element index,
//! independently of the library's layout code.
mod common;
use common::*;
use flatshard::checkpoint::{consolidate, Checkpoint, ParamInfo, ShardData, ShardDest};
use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, Sharding};
use flatshard::{Comm, CommOptions, DType, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DIR_ENV: &str = "FLATSHARD_TEST_CKPT_DIR";

/// Param i, element j, checkpoint version v: distinct and exact in f32.
fn value(i: usize, j: usize, v: usize) -> f32 {
    (v * 100_000 + i * 1000 + j) as f32 + 0.5
}
fn moment(i: usize, j: usize) -> f32 {
    -((i * 1000 + j) as f32) - 0.25
}

/// Flat param A: 2-D, 3-D, 1-D and an empty param; at 4 ranks (c = 27) the
/// shard boundaries 27, 54, 81 fall inside rows of the 2-D and 3-D params.
fn infos_a() -> Vec<ParamInfo> {
    vec![
        ParamInfo { name: "emb.weight".into(), shape: vec![7, 5] },
        ParamInfo { name: "attn.qkv".into(), shape: vec![3, 4, 5] },
        ParamInfo { name: "norm.bias".into(), shape: vec![13] },
        ParamInfo { name: "empty".into(), shape: vec![0, 3] },
    ]
}
fn infos_b() -> Vec<ParamInfo> {
    vec![ParamInfo { name: "head.weight".into(), shape: vec![4, 9] }, ParamInfo { name: "head.bias".into(), shape: vec![4] }]
}
fn numels(infos: &[ParamInfo]) -> Vec<usize> {
    infos.iter().map(|i| i.shape.iter().product::<u64>() as usize).collect()
}
/// Param index offset of B's params (so A and B values differ).
const B_BASE: usize = 10;

fn full_params(infos: &[ParamInfo], base: usize, v: usize, dt: DType) -> Vec<Vec<u8>> {
    numels(infos)
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let vals: Vec<f32> = (0..n).map(|j| value(base + i, j, v)).collect();
            encode(&vals, dt)
        })
        .collect()
}

fn encode(vals: &[f32], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => f32_bytes(vals),
        DType::BF16 => vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_ne_bytes()).collect(),
        DType::F64 => vals.iter().flat_map(|x| (*x as f64).to_ne_bytes()).collect(),
        _ => unreachable!(),
    }
}

fn decode(b: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => bytes_f32(b),
        DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect(),
        DType::F64 => b.chunks_exact(8).map(|c| f64::from_ne_bytes(c.try_into().unwrap()) as f32).collect(),
        _ => unreachable!(),
    }
}

fn build(comm: &Comm, rep: Option<&Comm>, infos: &[ParamInfo], base: usize, v: usize, dt: DType, opts: &FlatParamOptions) -> FlatParam {
    let bufs = full_params(infos, base, v, dt);
    let inputs: Vec<ParamInput<'_>> = bufs.iter().map(|b| ParamInput::host(b, dt)).collect();
    FlatParam::new(comm, rep, &inputs, opts).unwrap()
}

/// Build with zeros (what a resuming engine has before it loads).
fn build_zero(comm: &Comm, rep: Option<&Comm>, infos: &[ParamInfo], dt: DType, opts: &FlatParamOptions) -> FlatParam {
    let bufs: Vec<Vec<u8>> = numels(infos).iter().map(|&n| vec![0u8; n * dt.size()]).collect();
    let inputs: Vec<ParamInput<'_>> = bufs.iter().map(|b| ParamInput::host(b, dt)).collect();
    FlatParam::new(comm, rep, &inputs, opts).unwrap()
}

/// The shard-shaped optimizer moment of a flat param: moment(i, j) on
/// every real element, 0 on padding.
fn moment_buffer(fp: &FlatParam, base: usize) -> Vec<u8> {
    let mut vals = vec![0f32; fp.shard_numel() as usize];
    let l = fp.layout();
    for i in 0..l.numels.len() {
        let v = l.shard_view(i, fp.shard_rank());
        for k in 0..v.numel {
            vals[(v.offset_in_shard + k) as usize] = moment(base + i, (v.offset_in_param + k) as usize);
        }
    }
    f32_bytes(&vals)
}

/// Every real element of the shard (or of a shard-shaped buffer) holds `f(i, j)`.
fn check_shard(fp: &FlatParam, bytes: &[u8], dt: DType, f: impl Fn(usize, usize) -> f32, ctx: &str) {
    let vals = decode(bytes, dt);
    let l = fp.layout();
    for i in 0..l.numels.len() {
        let v = l.shard_view(i, fp.shard_rank());
        for k in 0..v.numel as usize {
            let want = f(i, v.offset_in_param as usize + k);
            let want = decode(&encode(&[want], dt), dt)[0];
            assert_eq!(vals[v.offset_in_shard as usize + k], want, "{ctx}: param {i} element {}", v.offset_in_param as usize + k);
        }
    }
}

fn dir() -> String {
    std::env::var(DIR_ENV).unwrap()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flatshard-ckpt-{tag}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The standard save: A's params and moment, B's params, two replicated tensors.
fn save_standard(comm: &Comm, path: &str, v: usize) {
    let fa = build(comm, None, &infos_a(), 0, v, DType::F32, &FlatParamOptions::default());
    let fb = build(comm, None, &infos_b(), B_BASE, v, DType::F32, &FlatParamOptions::default());
    let m = moment_buffer(&fa, 0);
    let mut ck = Checkpoint::save_begin(comm, path).unwrap();
    ck.save_flat_param(comm, &fa, None, &infos_a(), None, ShardData::Params).unwrap();
    ck.save_flat_param(comm, &fa, None, &infos_a(), Some("optim.exp_avg."), ShardData::Buffer(&m)).unwrap();
    ck.save_flat_param(comm, &fb, None, &infos_b(), None, ShardData::Params).unwrap();
    let step = 17i64 + v as i64;
    ck.save_tensor(comm, &ParamInfo { name: "step".into(), shape: vec![] }, &step.to_ne_bytes(), DType::I64).unwrap();
    let rope: Vec<f32> = (0..6).map(|k| k as f32 * 0.125 + v as f32).collect();
    ck.save_tensor(comm, &ParamInfo { name: "rope.freqs".into(), shape: vec![6] }, &f32_bytes(&rope), DType::F32).unwrap();
    ck.commit(comm).unwrap();
}

/// Load the standard checkpoint under `opts` / `dt` and check every value.
fn load_standard(comm: &Comm, rep: Option<&Comm>, path: &str, v: usize, dt: DType, opts: &FlatParamOptions, ctx: &str) {
    let mut fa = build_zero(comm, rep, &infos_a(), dt, opts);
    let mut fb = build_zero(comm, rep, &infos_b(), dt, opts);
    let mut m = vec![0u8; fa.shard_numel() as usize * dt.size()];
    let mut ck = Checkpoint::load_begin(comm, path).unwrap();
    ck.load_flat_param(comm, &mut fa, &infos_a(), None, ShardDest::Params).unwrap();
    ck.load_flat_param(comm, &mut fa, &infos_a(), Some("optim.exp_avg."), ShardDest::Buffer(&mut m)).unwrap();
    ck.load_flat_param(comm, &mut fb, &infos_b(), None, ShardDest::Params).unwrap();
    let mut step = [0u8; 8];
    ck.load_tensor(comm, &ParamInfo { name: "step".into(), shape: vec![] }, &mut step, DType::I64).unwrap();
    assert_eq!(i64::from_ne_bytes(step), 17 + v as i64, "{ctx}");
    let mut rope = vec![0u8; 6 * 8];
    ck.load_tensor(comm, &ParamInfo { name: "rope.freqs".into(), shape: vec![6] }, &mut rope, DType::F64).unwrap();
    assert_eq!(decode(&rope, DType::F64), (0..6).map(|k| k as f32 * 0.125 + v as f32).collect::<Vec<_>>(), "{ctx}");
    check_shard(&fa, fa.shard_bytes(), dt, |i, j| value(i, j, v), &format!("{ctx} A"));
    check_shard(&fa, &m, dt, moment, &format!("{ctx} A moment"));
    check_shard(&fb, fb.shard_bytes(), dt, |i, j| value(B_BASE + i, j, v), &format!("{ctx} B"));
}

#[test]
fn ckpt_w_save4() {
    if !is_worker() {
        return;
    }
    ranks("ckpt_w_save4", 4, &[], |comm| save_standard(&comm, &dir(), 0));
}

#[test]
fn ckpt_w_load_variants() {
    if !is_worker() {
        return;
    }
    ranks("ckpt_w_load_variants", 0, &[], |comm| {
        let (r, w) = (comm.rank(), comm.size());
        let path = dir();
        for (sharding, align) in [(Sharding::FullShard, false), (Sharding::ShardGradOp, false), (Sharding::FullShard, true), (Sharding::NoShard, true)] {
            let opts = FlatParamOptions { sharding, align_params: align, ..Default::default() };
            load_standard(&comm, None, &path, 0, DType::F32, &opts, &format!("rank {r}/{w} {sharding:?} align {align}"));
        }
        load_standard(&comm, None, &path, 0, DType::BF16, &FlatParamOptions::default(), &format!("rank {r}/{w} bf16"));
        if w == 4 {
            // HYBRID_SHARD: shard over {0,1} / {2,3}, replicate over {0,2} / {1,3}
            let shard = comm.new_subgroups(2).unwrap();
            let rep = comm.split((r % 2) as i32, r as i32).unwrap().unwrap();
            let opts = FlatParamOptions { sharding: Sharding::HybridShard, align_params: true, ..Default::default() };
            // the checkpoint comm is the whole job; flat params live on the shard group
            let mut fa = build_zero(&shard, Some(&rep), &infos_a(), DType::F32, &opts);
            let mut ck = Checkpoint::load_begin(&comm, &path).unwrap();
            ck.load_flat_param(&comm, &mut fa, &infos_a(), None, ShardDest::Params).unwrap();
            check_shard(&fa, fa.shard_bytes(), DType::F32, |i, j| value(i, j, 0), &format!("rank {r} HYBRID"));
            drop(ck);
            // HYBRID_SHARD and NO_SHARD saves: one holder of each shard writes
            // it (commit checks every element was written exactly once)
            let hdir = format!("{path}-hybrid");
            let fh = build(&shard, Some(&rep), &infos_a(), 0, 5, DType::F32, &opts);
            let fnos = build(&comm, None, &infos_b(), B_BASE, 5, DType::F32, &FlatParamOptions { sharding: Sharding::NoShard, ..Default::default() });
            let mut ck = Checkpoint::save_begin(&comm, &hdir).unwrap();
            ck.save_flat_param(&comm, &fh, Some(&rep), &infos_a(), None, ShardData::Params).unwrap();
            ck.save_flat_param(&comm, &fnos, None, &infos_b(), None, ShardData::Params).unwrap();
            ck.commit(&comm).unwrap();
            let mut fa = build_zero(&comm, None, &infos_a(), DType::F32, &FlatParamOptions::default());
            let mut fb = build_zero(&comm, None, &infos_b(), DType::F32, &FlatParamOptions::default());
            let mut ck = Checkpoint::load_begin(&comm, &hdir).unwrap();
            ck.load_flat_param(&comm, &mut fa, &infos_a(), None, ShardDest::Params).unwrap();
            ck.load_flat_param(&comm, &mut fb, &infos_b(), None, ShardDest::Params).unwrap();
            check_shard(&fa, fa.shard_bytes(), DType::F32, |i, j| value(i, j, 5), &format!("rank {r} saved HYBRID"));
            check_shard(&fb, fb.shard_bytes(), DType::F32, |i, j| value(B_BASE + i, j, 5), &format!("rank {r} saved NO_SHARD"));
            // a HYBRID flat param saved without its replicate comm: every replica writes → MISMATCH at commit
            let mut ck = Checkpoint::save_begin(&comm, &hdir).unwrap();
            ck.save_flat_param(&comm, &fh, None, &infos_a(), None, ShardData::Params).unwrap();
            let e = ck.commit(&comm).unwrap_err();
            assert!(e.kind == ErrorKind::Mismatch && e.msg.contains("exactly one rank"), "{e}");
            drop(ck);
            comm.barrier().unwrap();
            if r == 0 {
                std::fs::remove_dir_all(&hdir).unwrap();
            }
        }
        // Bytes: each rank reads exactly the bytes of its shard's real
        // elements. The kernel counts every read on this thread, the
        // communicator's too: a load of the empty param (no data, the same
        // collectives) gives that baseline.
        let mut fa = build_zero(&comm, None, &infos_a(), DType::F32, &FlatParamOptions::default());
        let empty = [infos_a()[3].clone()];
        let mut fe = build_zero(&comm, None, &empty, DType::F32, &FlatParamOptions::default());
        let mut ck = Checkpoint::load_begin(&comm, &path).unwrap();
        let before = rchar();
        ck.load_flat_param(&comm, &mut fe, &empty, None, ShardDest::Params).unwrap();
        let base = rchar() - before;
        let before = rchar();
        ck.load_flat_param(&comm, &mut fa, &infos_a(), None, ShardDest::Params).unwrap();
        let read = rchar() - before - base;
        let need: u64 = (0..4).map(|i| fa.layout().shard_view(i, fa.shard_rank()).numel * 4).sum();
        assert_eq!(read, need, "rank {r}/{w}: bytes read for its shard");
        println!("#: rank {r}/{w}: read {read} bytes for a shard of {need} bytes of real elements (model {} bytes)", fa.numel() * 4);
    });
}

/// Bytes this thread read through read/pread (Linux task I/O accounting).
fn rchar() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    s.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

fn run_ranks(name: &str, world: usize, dir: &Path) {
    let extra = [(DIR_ENV, dir.to_string_lossy().to_string()), transport_env("tcp")];
    let res = wait_all(spawn(name, world, &extra), Duration::from_secs(240));
    let failed: Vec<String> =
        res.iter().enumerate().filter(|(_, (c, _))| *c != Some(0)).map(|(r, (c, out))| format!("--- rank {r} (exit {c:?}):\n{out}")).collect();
    assert!(failed.is_empty(), "{name}: {} of {world} ranks failed:\n{}", failed.len(), failed.join("\n"));
    for (r, (_, out)) in res.iter().enumerate() {
        assert!(out.contains("running 1 test"), "{name}: rank {r} ran no test:\n{out}");
        for l in out.lines().filter_map(|l| l.find("#: ").map(|i| &l[i..])) {
            println!("{l}");
        }
    }
}

#[test]
fn save_at_4_load_at_4_3_1() {
    let d = tmp_dir("reshard");
    let ck = d.join("ckpt");
    run_ranks("ckpt_w_save4", 4, &ck);
    // 4 ranks × boxes, no temporary directory left, index written
    let names: Vec<String> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["ckpt".to_string()], "only the checkpoint directory remains");
    assert!(ck.join("flatshard_checkpoint.json").exists());
    for w in [4, 3, 1] {
        run_ranks("ckpt_w_load_variants", w, &ck);
    }
    // consolidate at 2 ranks, small files: every tensor whole, index complete
    run_ranks("ckpt_w_consolidate", 2, &ck);
    let hf = d.join("hf");
    let index = std::fs::read_to_string(hf.join("model.safetensors.index.json")).unwrap();
    assert!(index.contains("\"total_size\": "), "{index}");
    let files: Vec<_> =
        std::fs::read_dir(&hf).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.ends_with(".safetensors")).collect();
    assert!(files.len() >= 3, "max_file_bytes 256 splits the tensors: {files:?}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn ckpt_w_consolidate() {
    if !is_worker() {
        return;
    }
    ranks("ckpt_w_consolidate", 0, &[], |comm| {
        let src = dir();
        let dst = Path::new(&src).parent().unwrap().join("hf");
        consolidate(&comm, &src, dst.to_str().unwrap(), 256).unwrap();
        // the consolidated directory loads too (no DCP_SHARDING_INFO: whole tensors)
        load_standard(&comm, None, dst.to_str().unwrap(), 0, DType::F32, &FlatParamOptions::default(), "consolidated");
    });
}

fn world1() -> Comm {
    Comm::init("127.0.0.1", free_port(), 0, 1, CommOptions { timeout: Duration::from_secs(30), ..Default::default() }).unwrap()
}

#[test]
fn ckpt_w_mismatch() {
    if !is_worker() {
        return;
    }
    ranks("ckpt_w_mismatch", 0, &[], |comm| {
        let r = comm.rank();
        let path = dir();
        let fa = build(&comm, None, &infos_a(), 0, 0, DType::F32, &FlatParamOptions::default());
        // names differ on rank 1 → MISMATCH everywhere; then commit is INVALID_STATE everywhere
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        let mut infos = infos_a();
        if r == 1 {
            infos[0].name = "other".into();
        }
        let e = ck.save_flat_param(&comm, &fa, None, &infos, None, ShardData::Params).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch, "rank {r}: {e}");
        assert_eq!(ck.commit(&comm).unwrap_err().kind, ErrorKind::InvalidState);
        drop(ck);
        // a wrong shape on rank 2 only: INVALID_ARGUMENT there, MISMATCH elsewhere
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        let mut infos = infos_a();
        if r == 2 {
            infos[1].shape = vec![3, 4, 6];
        }
        let e = ck.save_flat_param(&comm, &fa, None, &infos, None, ShardData::Params).unwrap_err();
        let want = if r == 2 { ErrorKind::InvalidArgument } else { ErrorKind::Mismatch };
        assert_eq!(e.kind, want, "rank {r}: {e}");
        if r == 2 {
            assert!(e.msg.contains("attn.qkv") && e.msg.contains("[3, 4, 6]") && e.msg.contains("60"), "{e}");
        }
        drop(ck);
        // ndim 9 and a name with a path separator
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        let mut infos = infos_a();
        infos[2] = ParamInfo { name: "x".into(), shape: vec![1, 1, 1, 1, 13, 1, 1, 1, 1] };
        let e = ck.save_flat_param(&comm, &fa, None, &infos, None, ShardData::Params).unwrap_err();
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("ndim 9"), "{e}");
        drop(ck);
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        let mut infos = infos_a();
        infos[2].name = "../escape".into();
        let e = ck.save_flat_param(&comm, &fa, None, &infos, None, ShardData::Params).unwrap_err();
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("path separators"), "{e}");
        drop(ck);
        // a save discarded at free leaves no temporary directory, and dir untouched
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        ck.save_flat_param(&comm, &fa, None, &infos_a(), None, ShardData::Params).unwrap();
        comm.barrier().unwrap(); // every rank has written (the last to free removes the directory)
        drop(ck);
        comm.barrier().unwrap();
        let parent = Path::new(&path).parent().unwrap();
        let left: Vec<String> = std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        assert!(left.iter().all(|n| !n.contains("flatshard-tmp")), "rank {r}: {left:?}");
        assert!(!Path::new(&path).exists(), "nothing was committed");
        // a duplicate name across calls; the load side refuses a save object
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        ck.save_flat_param(&comm, &fa, None, &infos_a(), None, ShardData::Params).unwrap();
        let e = ck.save_flat_param(&comm, &fa, None, &infos_a(), None, ShardData::Params).unwrap_err();
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("already saved"), "{e}");
        drop(ck);
        comm.barrier().unwrap();
    });
}

#[test]
fn mismatched_and_invalid_calls() {
    let d = tmp_dir("mismatch");
    run_ranks("ckpt_w_mismatch", 3, &d.join("ckpt"));
    std::fs::remove_dir_all(&d).unwrap();
}

/// Hostile files at load: each is INVALID_ARGUMENT naming the file and the field.
#[test]
fn hostile_files_are_refused() {
    let d = tmp_dir("hostile");
    let comm = world1();
    let path = d.join("ckpt");
    save_standard(&comm, path.to_str().unwrap(), 0);
    let f = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("shard-00000-00000-0"))
        .unwrap();
    let good = std::fs::read(&f).unwrap();
    let hl = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + hl].to_vec()).unwrap();
    let with_header = |h: &str| {
        let mut h = h.to_string();
        while h.len() < hl {
            h.push(' ');
        }
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&good[8 + hl..]);
        b
    };
    let first_off = header.find("\"data_offsets\":[0,").unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated data", good[..good.len() - 3].to_vec(), "past the data section"),
        ("truncated header", good[..8 + hl / 2].to_vec(), "truncated"),
        ("7 bytes", good[..7].to_vec(), "shorter than the 8-byte header length"),
        ("huge header length", [&u64::MAX.to_le_bytes()[..], &good[8..]].concat(), "over the limit"),
        ("unknown dtype", with_header(&header.replacen("\"F32\"", "\"F8_E4M3\"", 1)), "dtype \"F8_E4M3\""),
        ("offset overflow", with_header(&header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[18446744073709551615,", 1)), "data_offsets"),
        ("overlap", with_header(&format!("{}{}", &header[..first_off], header[first_off..].replacen("[0,", "[4,", 1))), "data_offsets"),
        ("shape overflow", with_header(&header.replacen("\"shape\":[", "\"shape\":[4294967296,4294967296,", 1)), "overflows"),
        ("path separator", with_header(&header.replacen("\"emb.weight\":{", "\"../emb\":{", 1)), "path separators"),
        ("not json", with_header("{\"a\":"), "invalid JSON"),
    ];
    for (what, bytes, want) in cases {
        std::fs::write(&f, &bytes).unwrap();
        let e = Checkpoint::load_begin(&comm, path.to_str().unwrap()).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{what}: {e}");
        assert!(e.msg.contains(&f.display().to_string()) && e.msg.contains(want), "{what}: {e}");
    }
    // a box moved by its DCP_SHARDING_INFO offsets: the boxes no longer cover the tensor
    std::fs::write(&f, &good).unwrap();
    Checkpoint::load_begin(&comm, path.to_str().unwrap()).unwrap();
    std::fs::write(&f, with_header(&header.replacen("saved_offsets\\\":[0,0]", "saved_offsets\\\":[1,0]", 1))).unwrap();
    let e = Checkpoint::load_begin(&comm, path.to_str().unwrap()).err().unwrap();
    assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("boxes missing"), "{e}");
    // a dtype change int ↔ float, a missing name, a wrong shape
    save_standard(&comm, path.to_str().unwrap(), 0);
    let mut ck = Checkpoint::load_begin(&comm, path.to_str().unwrap()).unwrap();
    let mut step = [0u8; 8];
    let e = ck.load_tensor(&comm, &ParamInfo { name: "step".into(), shape: vec![] }, &mut step, DType::F64).unwrap_err();
    assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("\"step\"") && e.msg.contains("i64"), "{e}");
    let e = ck.load_tensor(&comm, &ParamInfo { name: "nope".into(), shape: vec![] }, &mut step, DType::I64).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "after an error the object only accepts free: {e}");
    let mut ck = Checkpoint::load_begin(&comm, path.to_str().unwrap()).unwrap();
    let e = ck.load_tensor(&comm, &ParamInfo { name: "nope".into(), shape: vec![] }, &mut step, DType::I64).unwrap_err();
    assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("\"nope\" is not in the checkpoint"), "{e}");
    let mut ck = Checkpoint::load_begin(&comm, path.to_str().unwrap()).unwrap();
    let mut rope = [0u8; 24];
    let e = ck.load_tensor(&comm, &ParamInfo { name: "rope.freqs".into(), shape: vec![2, 3] }, &mut rope, DType::F32).unwrap_err();
    assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("[6]") && e.msg.contains("[2, 3]"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A stale temporary directory from a crashed save is removed by the next save.
#[test]
fn stale_temporary_directories_are_removed() {
    let d = tmp_dir("stale");
    let comm = world1();
    let path = d.join("ckpt");
    let stale = d.join(".ckpt.flatshard-tmp-00000000deadbeef");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("shard-00000-00000-0.safetensors"), b"partial").unwrap();
    save_standard(&comm, path.to_str().unwrap(), 3);
    save_standard(&comm, path.to_str().unwrap(), 4); // exchange with an existing dir
    let names: Vec<String> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["ckpt".to_string()]);
    load_standard(&comm, None, path.to_str().unwrap(), 4, DType::F32, &FlatParamOptions::default(), "after two saves");
    std::fs::remove_dir_all(&d).unwrap();
}

// ------------------------------------------------------------ kill test

/// A larger model so a save takes a while: 4 × 1M f32 elements.
fn infos_big() -> Vec<ParamInfo> {
    (0..4).map(|i| ParamInfo { name: format!("layer{i}.weight"), shape: vec![1000, 1000 + i as u64] }).collect()
}

#[test]
fn ckpt_w_kill_save() {
    if !is_worker() {
        return;
    }
    let version: usize = std::env::var("FLATSHARD_TEST_VERSION").unwrap().parse().unwrap();
    let comm = Comm::init_from_env(CommOptions { timeout: Duration::from_secs(20), ..worker_options() }).unwrap();
    let fp = build(&comm, None, &infos_big(), 0, version, DType::F32, &FlatParamOptions::default());
    let mut ck = Checkpoint::save_begin(&comm, &dir()).unwrap();
    ck.save_flat_param(&comm, &fp, None, &infos_big(), None, ShardData::Params).unwrap();
    let m = moment_buffer(&fp, 0);
    ck.save_flat_param(&comm, &fp, None, &infos_big(), Some("m."), ShardData::Buffer(&m)).unwrap();
    ck.commit(&comm).unwrap();
}

/// The version of the checkpoint in `path`, checked element by element.
fn loaded_version(comm: &Comm, path: &Path) -> usize {
    let mut fp = build_zero(comm, None, &infos_big(), DType::F32, &FlatParamOptions::default());
    let mut ck = Checkpoint::load_begin(comm, path.to_str().unwrap()).unwrap();
    ck.load_flat_param(comm, &mut fp, &infos_big(), None, ShardDest::Params).unwrap();
    let first = bytes_f32(&fp.shard_bytes()[..4])[0];
    let v = (first as usize) / 100_000;
    check_shard(&fp, fp.shard_bytes(), DType::F32, |i, j| value(i, j, v), &format!("version {v}"));
    v
}

#[test]
fn rank_killed_during_save_keeps_previous_checkpoint() {
    let d = tmp_dir("kill");
    let path = d.join("ckpt");
    let spawn_save = |v: usize| {
        let extra = [(DIR_ENV, path.to_string_lossy().to_string()), ("FLATSHARD_TEST_VERSION", v.to_string())];
        spawn("ckpt_w_kill_save", 4, &extra)
    };
    let t0 = Instant::now();
    for (code, out) in wait_all(spawn_save(0), Duration::from_secs(120)) {
        assert_eq!(code, Some(0), "{out}");
    }
    let full = t0.elapsed();
    let comm = world1();
    assert_eq!(loaded_version(&comm, &path), 0);
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut prev, mut kept, mut advanced) = (0usize, 0, 0);
    for v in 1..=20 {
        let mut children = spawn_save(v);
        let delay = Duration::from_micros(next() % (full.as_micros() as u64 + 1));
        let victim = (next() % 4) as usize;
        std::thread::sleep(delay);
        let _ = children[victim].kill();
        wait_all(children, Duration::from_secs(60));
        let got = loaded_version(&comm, &path);
        assert!(got == prev || got == v, "run {v}: found version {got}, expected {prev} or {v}");
        if got == v {
            advanced += 1;
        } else {
            kept += 1;
        }
        prev = got;
    }
    println!("#: 20 saves with a rank killed after a random delay (full save {full:?}): {kept} kept the previous checkpoint, {advanced} had committed");
    assert!(kept > 0, "no kill landed inside a save: the test did not test anything");
    // the next save removes every temporary directory the kills left
    for (code, out) in wait_all(spawn_save(21), Duration::from_secs(120)) {
        assert_eq!(code, Some(0), "{out}");
    }
    let names: Vec<String> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["ckpt".to_string()], "temporary directories left");
    assert_eq!(loaded_version(&comm, &path), 21);
    std::fs::remove_dir_all(&d).unwrap();
}

// ------------------------------------------------------------ memory

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// Reset the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0). Where the
/// kernel refuses, the peak since the start counts (only stricter: nothing
/// before the save allocated more than the shard).
fn reset_peak() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        println!("#: cannot reset the peak RSS ({e}): measuring against the peak since the start");
    }
}

#[test]
fn ckpt_w_rss_1gib() {
    if !is_worker() {
        return;
    }
    ranks("ckpt_w_rss_1gib", 0, &[], |comm| {
        let r = comm.rank();
        // 1 GiB of f32 in 4 params of 8192 x 8192; the full inputs are
        // untouched zero pages, so only the shard is resident.
        let infos: Vec<ParamInfo> = (0..4).map(|i| ParamInfo { name: format!("w{i}"), shape: vec![8192, 8192] }).collect();
        let mut fp = {
            let zeros = vec![0u8; 8192 * 8192 * 4];
            let inputs: Vec<ParamInput<'_>> = (0..4).map(|_| ParamInput::host(&zeros, DType::F32)).collect();
            FlatParam::new(&comm, None, &inputs, &FlatParamOptions::default()).unwrap()
        };
        for (k, x) in fp.shard_bytes_mut().chunks_exact_mut(4).enumerate() {
            x.copy_from_slice(&(k as f32).to_ne_bytes());
        }
        let shard = fp.shard_numel() * 4;
        let path = dir();
        comm.barrier().unwrap();
        let rss0 = status_kib("VmRSS:");
        reset_peak();
        let t = Instant::now();
        let mut ck = Checkpoint::save_begin(&comm, &path).unwrap();
        ck.save_flat_param(&comm, &fp, None, &infos, None, ShardData::Params).unwrap();
        ck.commit(&comm).unwrap();
        let save_s = t.elapsed().as_secs_f64();
        let peak = status_kib("VmHWM:");
        let grew = peak.saturating_sub(rss0) * 1024;
        assert!(grew <= shard + (64 << 20), "rank {r}: peak RSS grew by {grew} bytes during the save (shard {shard})");
        // load into a fresh buffer of the same layout
        fp.shard_bytes_mut().fill(0);
        comm.barrier().unwrap();
        let rss1 = status_kib("VmRSS:");
        reset_peak();
        let t = Instant::now();
        let mut ck = Checkpoint::load_begin(&comm, &path).unwrap();
        ck.load_flat_param(&comm, &mut fp, &infos, None, ShardDest::Params).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        let grew_load = status_kib("VmHWM:").saturating_sub(rss1) * 1024;
        assert!(grew_load <= 64 << 20, "rank {r}: peak RSS grew by {grew_load} bytes during the load");
        for (k, x) in fp.shard_bytes().chunks_exact(4).enumerate().step_by(4099) {
            assert_eq!(f32::from_ne_bytes(x.try_into().unwrap()), k as f32);
        }
        println!(
            "#: rank {r}: 1 GiB model, shard {} MiB: save {save_s:.2} s (peak RSS +{} MiB), load {load_s:.2} s (peak RSS +{} MiB)",
            shard >> 20,
            grew >> 20,
            grew_load >> 20
        );
    });
}

#[test]
fn rss_of_a_1gib_save_on_4_ranks() {
    let d = tmp_dir("rss");
    run_ranks("ckpt_w_rss_1gib", 4, &d.join("ckpt"));
    std::fs::remove_dir_all(&d).unwrap();
}

// ------------------------------------------------------------ C boundary

/// The C entry points: NULL arguments, a bad info, state errors, and a round
/// trip through the C types (world of 1).
#[test]
fn c_api_arguments_and_states() {
    use flatshard::ffi::checkpoint::*;
    use flatshard::ffi::comm::*;
    use flatshard::ffi::flat_param::*;
    use flatshard::ffi::flatshard_status::*;
    use flatshard::ffi::*;
    use std::ffi::CString;
    use std::ptr::{null, null_mut};
    let d = tmp_dir("capi");
    let dir = CString::new(d.join("ckpt").to_str().unwrap()).unwrap();
    unsafe {
        let mut comm = null_mut();
        assert_eq!(flatshard_comm_init(null(), free_port(), 0, 1, null(), &mut comm), FLATSHARD_OK);
        let mut ck = null_mut();
        assert_eq!(flatshard_checkpoint_save_begin(null_mut(), dir.as_ptr(), &mut ck), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_checkpoint_save_begin(comm, null(), &mut ck), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_checkpoint_save_begin(comm, dir.as_ptr(), null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_checkpoint_commit(null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);
        flatshard_checkpoint_free(null_mut());
        // a flat param of one 2x3 param
        let mut vals: Vec<f32> = (0..6).map(|k| k as f32).collect();
        let t = flatshard_tensor {
            data: vals.as_mut_ptr() as *mut _,
            grad: null_mut(),
            numel: 6,
            dtype: DtypeArg(0),
            device: flatshard_device { r#type: DeviceTypeArg(0), index: 0 },
        };
        let mut fp = null_mut();
        assert_eq!(flatshard_flat_param_new(comm, &t, 1, null(), &mut fp), FLATSHARD_OK);
        let name = CString::new("w").unwrap();
        let shape = [2u64, 3];
        let info = flatshard_param_info { name: name.as_ptr(), ndim: 2, shape: shape.as_ptr() };
        assert_eq!(flatshard_checkpoint_save_begin(comm, dir.as_ptr(), &mut ck), FLATSHARD_OK);
        let bad = flatshard_param_info { name: name.as_ptr(), ndim: 2, shape: null() };
        assert_eq!(flatshard_checkpoint_save_flat_param(ck, fp, &bad, 1, null(), null()), FLATSHARD_ERR_INVALID_ARGUMENT);
        let msg = std::ffi::CStr::from_ptr(flatshard_last_error()).to_string_lossy().to_string();
        assert!(msg.contains("infos[0].shape is NULL"), "{msg}");
        // after an error: INVALID_STATE until free
        assert_eq!(flatshard_checkpoint_save_flat_param(ck, fp, &info, 1, null(), null()), FLATSHARD_ERR_INVALID_STATE);
        assert_eq!(flatshard_checkpoint_commit(ck), FLATSHARD_ERR_INVALID_STATE);
        flatshard_checkpoint_free(ck);
        // a clean save; the comm handle freed before the checkpoint (it keeps a reference)
        assert_eq!(flatshard_checkpoint_save_begin(comm, dir.as_ptr(), &mut ck), FLATSHARD_OK);
        assert_eq!(flatshard_checkpoint_save_flat_param(ck, fp, &info, 1, null(), null()), FLATSHARD_OK);
        let mut ck2 = null_mut();
        assert_eq!(flatshard_checkpoint_load_begin(comm, dir.as_ptr(), &mut ck2), FLATSHARD_ERR_IO, "nothing committed yet");
        assert_eq!(flatshard_checkpoint_commit(ck), FLATSHARD_OK);
        assert_eq!(flatshard_checkpoint_commit(ck), FLATSHARD_ERR_INVALID_STATE, "committed twice");
        flatshard_checkpoint_free(ck);
        // load into an unsharded flat param: INVALID_STATE; sharded: the values
        assert_eq!(flatshard_checkpoint_load_begin(comm, dir.as_ptr(), &mut ck), FLATSHARD_OK);
        assert_eq!(flatshard_flat_param_unshard(fp, null()), FLATSHARD_OK);
        assert_eq!(flatshard_checkpoint_load_flat_param(ck, fp, &info, 1, null(), null_mut()), FLATSHARD_ERR_INVALID_STATE);
        flatshard_checkpoint_free(ck);
        assert_eq!(flatshard_flat_param_reshard(fp), FLATSHARD_OK);
        let mut sh = std::mem::zeroed::<flatshard_tensor>();
        assert_eq!(flatshard_flat_param_shard(fp, &mut sh), FLATSHARD_OK);
        std::slice::from_raw_parts_mut(sh.data as *mut f32, 6).fill(-1.0);
        assert_eq!(flatshard_checkpoint_load_begin(comm, dir.as_ptr(), &mut ck), FLATSHARD_OK);
        flatshard_comm_free(comm);
        assert_eq!(flatshard_checkpoint_load_flat_param(ck, fp, &info, 1, null(), null_mut()), FLATSHARD_OK);
        assert_eq!(std::slice::from_raw_parts(sh.data as *const f32, 6), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        flatshard_checkpoint_free(ck);
        // an in-flight unshard_async is waited for, and then the flat param is unsharded
        let mut work = null_mut();
        assert_eq!(flatshard_flat_param_unshard_async(fp, null(), &mut work), FLATSHARD_OK);
        let mut comm2 = null_mut();
        assert_eq!(flatshard_comm_init(null(), free_port(), 0, 1, null(), &mut comm2), FLATSHARD_OK);
        assert_eq!(flatshard_checkpoint_save_begin(comm2, dir.as_ptr(), &mut ck), FLATSHARD_OK);
        assert_eq!(flatshard_checkpoint_save_flat_param(ck, fp, &info, 1, null(), null()), FLATSHARD_ERR_INVALID_STATE);
        flatshard_checkpoint_free(ck);
        flatshard::ffi::work::flatshard_work_free(work);
        flatshard_flat_param_free(fp);
        flatshard_comm_free(comm2);
    }
    std::fs::remove_dir_all(&d).unwrap();
}
