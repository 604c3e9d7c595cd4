//! Bad input through the C ABI (called from Rust as a C caller would):
//! overflowing counts, numel * itemsize overflow, out-of-range enums in
//! tensors, NULL out-params. Each must be INVALID_ARGUMENT with a message that
//! names the argument, and must not touch memory.
use flatshard::ffi::averaging::flatshard_average_parameters;
use flatshard::ffi::comm::*;
use flatshard::ffi::flat_param::*;
use flatshard::ffi::*;
use std::ffi::CStr;

fn last() -> String {
    unsafe { CStr::from_ptr(flatshard_last_error()).to_string_lossy().into_owned() }
}

fn solo() -> *mut flatshard_comm {
    let mut c = std::ptr::null_mut();
    let st = unsafe { flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c) };
    assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last());
    c
}

fn tensor(data: *mut u8, numel: u64, dtype: i32, device: i32) -> flatshard_tensor {
    flatshard_tensor {
        data: data as *mut _,
        grad: std::ptr::null_mut(),
        numel,
        dtype: DtypeArg(dtype),
        device: flatshard_device { r#type: DeviceTypeArg(device), index: 0 },
    }
}

#[test]
fn overflowing_counts_are_invalid_arguments() {
    let c = solo();
    let mut x = [0f32; 4];
    let p = x.as_mut_ptr() as *mut std::ffi::c_void;
    unsafe {
        let st = flatshard_all_reduce(c, p, u64::MAX / 2, DtypeArg(0), ReduceOpArg(0));
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("overflow"), "{}", last());
        let st = flatshard_all_gather(c, p, p, u64::MAX / 3, DtypeArg(1));
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT, "{}", last());
        let st = flatshard_reduce_scatter(c, p, p, u64::MAX, DtypeArg(0), ReduceOpArg(0));
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT, "{}", last());
        // AVG on an integer dtype
        let st = flatshard_all_reduce(c, p, 4, DtypeArg(4), ReduceOpArg(1));
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("AVG"), "{}", last());
        // out-of-range enums
        assert_eq!(flatshard_all_reduce(c, p, 4, DtypeArg(7), ReduceOpArg(0)), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("dt"), "{}", last());
        assert_eq!(flatshard_all_reduce(c, p, 4, DtypeArg(0), ReduceOpArg(-1)), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("op"), "{}", last());
        assert_eq!(x, [0.0; 4], "a refused call wrote the buffer");
        flatshard_comm_free(c);
    }
}

#[test]
fn bad_tensors_for_flat_params_and_averaging() {
    let c = solo();
    let mut x = [1f32; 8];
    let xp = x.as_mut_ptr() as *mut u8;
    unsafe {
        let mut fp = std::ptr::null_mut();
        // numel * itemsize overflows
        let ts = [tensor(xp, u64::MAX / 2, 0, 0)];
        let st = flatshard_flat_param_new(c, ts.as_ptr(), 1, std::ptr::null(), &mut fp);
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT, "{}", last());
        assert!(last().contains("params[0]"), "{}", last());
        assert!(fp.is_null(), "out-param written on failure");
        // bad dtype / device enum in the tensor
        let ts = [tensor(xp, 8, 9, 0)];
        assert_eq!(flatshard_flat_param_new(c, ts.as_ptr(), 1, std::ptr::null(), &mut fp), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        let ts = [tensor(xp, 8, 0, 5)];
        assert_eq!(flatshard_flat_param_new(c, ts.as_ptr(), 1, std::ptr::null(), &mut fp), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("device"), "{}", last());
        // NULL data with numel > 0
        let ts = [tensor(std::ptr::null_mut(), 8, 0, 0)];
        assert_eq!(flatshard_flat_param_new(c, ts.as_ptr(), 1, std::ptr::null(), &mut fp), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        // NULL out
        let ts = [tensor(xp, 8, 0, 0)];
        assert_eq!(flatshard_flat_param_new(c, ts.as_ptr(), 1, std::ptr::null(), std::ptr::null_mut()), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        // averaging: overflow and NULL array
        let mut ts = [tensor(xp, u64::MAX / 4, 0, 0)];
        assert_eq!(flatshard_average_parameters(c, ts.as_mut_ptr(), 1, 0), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_average_parameters(c, std::ptr::null_mut(), 3, 0), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("params"), "{}", last());
        assert_eq!(x, [1.0; 8]);
        flatshard_comm_free(c);
    }
}

/// flatshard_average_flat_params through the C ABI: the replicate comm must be
/// the one the flat param was built with, the flat param must be sharded, and
/// NULL arrays are refused.
#[test]
fn average_flat_params_argument_checks() {
    let c = solo();
    let rep = solo();
    let other = solo();
    let mut x = [3f32; 8];
    unsafe {
        let mut o: flatshard_flat_param_options = std::mem::zeroed();
        flatshard_flat_param_options_init(&mut o);
        o.sharding = ShardingArg(3); // HYBRID_SHARD
        o.replicate_comm = rep;
        let ts = [tensor(x.as_mut_ptr() as *mut u8, 8, 0, 0)];
        let mut fp = std::ptr::null_mut();
        assert_eq!(flatshard_flat_param_new(c, ts.as_ptr(), 1, &o, &mut fp), flatshard_status::FLATSHARD_OK, "{}", last());
        let fps = [fp];
        assert_eq!(flatshard_average_flat_params(other, fps.as_ptr(), 1), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("replicate_comm"), "{}", last());
        assert_eq!(flatshard_average_flat_params(rep, std::ptr::null(), 1), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_average_flat_params(rep, [fp, fp].as_ptr(), 2), flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last().contains("repeats"), "{}", last());
        assert_eq!(flatshard_flat_param_unshard(fp, std::ptr::null()), flatshard_status::FLATSHARD_OK, "{}", last());
        assert_eq!(flatshard_average_flat_params(rep, fps.as_ptr(), 1), flatshard_status::FLATSHARD_ERR_INVALID_STATE);
        assert_eq!(flatshard_flat_param_reshard(fp), flatshard_status::FLATSHARD_OK);
        assert_eq!(flatshard_average_flat_params(rep, fps.as_ptr(), 1), flatshard_status::FLATSHARD_OK, "{}", last());
        let mut s: flatshard_tensor = std::mem::zeroed();
        assert_eq!(flatshard_flat_param_shard(fp, &mut s), flatshard_status::FLATSHARD_OK);
        assert_eq!(std::slice::from_raw_parts(s.data as *const f32, 8), &[3.0; 8]);
        flatshard_flat_param_free(fp);
        flatshard_comm_free(other);
        flatshard_comm_free(rep);
        flatshard_comm_free(c);
    }
}
