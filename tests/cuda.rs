//! CUDA / NCCL. Without a driver (this project's CI machines) the entry points
//! must report UNSUPPORTED with a clear message; the GPU tests are #[ignore]d
//! (reported as ignored = skipped by cargo, never as passed) and run with
//! `scripts/gpu-test.sh` (`cargo test --test cuda -- --ignored`) on a GPU.
use flatshard::ffi::comm::flatshard_comm;
use flatshard::ffi::cuda::*;
use flatshard::ffi::{flatshard_last_error, flatshard_status};
use std::ffi::CStr;

fn has_gpu() -> bool {
    flatshard::cuda::driver().is_ok()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(flatshard_last_error()).to_string_lossy().into_owned() }
}

#[test]
fn without_a_driver_cuda_entry_points_are_unsupported() {
    if has_gpu() {
        eprintln!("a CUDA driver is present: the no-driver paths are not reachable here");
        return;
    }
    let mut out: *mut flatshard_comm = std::ptr::null_mut();
    let st = unsafe { flatshard_comm_init_nccl(c"127.0.0.1".as_ptr(), 29999, 0, 1, 0, std::ptr::null_mut(), std::ptr::null(), &mut out) };
    assert_eq!(st, flatshard_status::FLATSHARD_ERR_UNSUPPORTED);
    assert!(out.is_null(), "out-param written on failure");
    let msg = last_error();
    assert!(msg.contains("CUDA driver") || msg.contains("cuda"), "unclear message: {msg}");
    let mut fake = 0u64;
    let st = unsafe { flatshard_comm_wrap_nccl(&mut fake as *mut u64 as *mut _, 0, std::ptr::null_mut(), &mut out) };
    assert_eq!(st, flatshard_status::FLATSHARD_ERR_UNSUPPORTED);
    assert!(!flatshard::cuda::is_device_ptr(&fake as *const u64 as *const u8));
    // NULL handle still INVALID_ARGUMENT, driver or not
    assert_eq!(unsafe { flatshard_comm_synchronize(std::ptr::null_mut()) }, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
}

#[test]
#[ignore = "needs a CUDA GPU with NCCL: scripts/gpu-test.sh"]
fn nccl_world_one_all_reduce_on_device() {
    assert!(has_gpu(), "skipped: no CUDA driver");
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    let st = unsafe { flatshard_comm_init_nccl(std::ptr::null(), 0, 0, 1, 0, std::ptr::null_mut(), std::ptr::null(), &mut c) };
    assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last_error());
    assert_eq!(unsafe { flatshard::ffi::comm::flatshard_barrier(c) }, flatshard_status::FLATSHARD_OK, "{}", last_error());
    assert_eq!(unsafe { flatshard_comm_synchronize(c) }, flatshard_status::FLATSHARD_OK, "{}", last_error());
    unsafe { flatshard::ffi::comm::flatshard_comm_free(c) };
}

#[test]
fn averaging_cuda_tensors_without_a_driver_is_unsupported() {
    use flatshard::ffi::averaging::flatshard_average_parameters;
    use flatshard::ffi::comm::{flatshard_comm_free, flatshard_comm_init};
    use flatshard::ffi::{flatshard_device, flatshard_tensor, DeviceTypeArg, DtypeArg};
    if has_gpu() {
        eprintln!("a CUDA driver is present: the no-driver path is not reachable here");
        return;
    }
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    unsafe {
        assert_eq!(flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c), flatshard_status::FLATSHARD_OK);
        let mut fake = [0f32; 4];
        let mut t = [flatshard_tensor {
            data: fake.as_mut_ptr() as *mut _,
            grad: std::ptr::null_mut(),
            numel: 4,
            dtype: DtypeArg(0),
            device: flatshard_device { r#type: DeviceTypeArg(1), index: 0 },
        }];
        assert_eq!(flatshard_average_parameters(c, t.as_mut_ptr(), 1, 0), flatshard_status::FLATSHARD_ERR_UNSUPPORTED);
        assert!(last_error().contains("CUDA"), "{}", last_error());
        assert_eq!(fake, [0.0; 4]);
        flatshard_comm_free(c);
    }
}
