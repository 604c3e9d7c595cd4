"""The C structs of include/flatshard.h as ctypes types, shared by the Python
interop tests (which load libflatshard.so with ctypes). Not a test itself:
scripts/test.sh runs only tests/python/test_*.py."""

import ctypes as C
import os
import random
import socket


class Device(C.Structure):
    _fields_ = [("type", C.c_int32), ("index", C.c_int32)]


class Tensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("grad", C.c_void_p), ("numel", C.c_uint64),
                ("dtype", C.c_int32), ("device", Device)]


class FpOptions(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("sharding", C.c_int32), ("align_params", C.c_int32),
                ("sync_from_rank0", C.c_int32), ("has_param_dtype", C.c_int32), ("param_dtype", C.c_int32),
                ("has_reduce_dtype", C.c_int32), ("reduce_dtype", C.c_int32), ("replicate_comm", C.c_void_p)]


class UnshardOptions(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("writeback", C.c_int32), ("rank0_only", C.c_int32),
                ("offload_to_cpu", C.c_int32), ("with_grads", C.c_int32)]


class ParamInfo(C.Structure):
    _fields_ = [("name", C.c_char_p), ("ndim", C.c_uint32), ("shape", C.POINTER(C.c_uint64))]


def free_port():
    """A free loopback port below Linux's ephemeral range (32768-60999), so no
    outgoing connection of a concurrently running test takes it between this
    check and the rendezvous store's bind (bind(0) would pick from that range)."""
    rng = random.Random(os.getpid() * 1_000_003 + random.getrandbits(32))
    for _ in range(2000):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
