// LibTorch extension over flatshard:
//  (a) flat-parameter views as torch tensors (torch::from_blob, zero-copy);
//  (b) a c10d::ProcessGroup adapted into flatshard_collectives, so flatshard
//      rides on PyTorch's own process group (gloo, NCCL, ...).
// Built by torch.utils.cpp_extension (see tests/python/test_libtorch_ext.py).
#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "flatshard.h"

namespace {

void check(flatshard_status s) {
  if (s != FLATSHARD_OK)
    throw std::runtime_error(std::string(flatshard_status_name(s)) + ": " + flatshard_last_error());
}

at::ScalarType to_torch(flatshard_dtype dt) {
  switch (dt) {
    case FLATSHARD_F32: return at::kFloat;
    case FLATSHARD_F64: return at::kDouble;
    case FLATSHARD_F16: return at::kHalf;
    case FLATSHARD_BF16: return at::kBFloat16;
    case FLATSHARD_I32: return at::kInt;
    case FLATSHARD_I64: return at::kLong;
    default: return at::kByte;
  }
}

flatshard_dtype from_torch(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FLATSHARD_F32;
    case at::kDouble: return FLATSHARD_F64;
    case at::kHalf: return FLATSHARD_F16;
    case at::kBFloat16: return FLATSHARD_BF16;
    case at::kInt: return FLATSHARD_I32;
    case at::kLong: return FLATSHARD_I64;
    case at::kByte: return FLATSHARD_U8;
    default: throw std::invalid_argument("flatshard: unsupported tensor dtype");
  }
}

c10d::ReduceOp to_c10d(flatshard_reduce_op op) {
  switch (op) {
    case FLATSHARD_MIN: return c10d::ReduceOp::MIN;
    case FLATSHARD_MAX: return c10d::ReduceOp::MAX;
    case FLATSHARD_AVG: return c10d::ReduceOp::AVG;  // flatshard sends SUM and divides itself
    default: return c10d::ReduceOp::SUM;
  }
}

at::Tensor blob(void *p, uint64_t n, flatshard_dtype dt) {
  return torch::from_blob(p, {static_cast<int64_t>(n)}, torch::TensorOptions().dtype(to_torch(dt)));
}

// ---- c10d::ProcessGroup as flatshard_collectives ----
struct PG {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
};

template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception &e) {
    fprintf(stderr, "flatshard c10d callback: %s\n", e.what());
    return 1;
  }
}

int pg_all_reduce(void *ctx, void *buf, uint64_t count, flatshard_dtype dt, flatshard_reduce_op op) {
  return guarded([&] {
    std::vector<at::Tensor> v{blob(buf, count, dt)};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    static_cast<PG *>(ctx)->pg->allreduce(v, o)->wait();
  });
}
int pg_all_gather(void *ctx, const void *send, void *recv, uint64_t n, flatshard_dtype dt) {
  return guarded([&] {
    auto *g = static_cast<PG *>(ctx);
    auto out = blob(recv, n * static_cast<uint64_t>(g->pg->getSize()), dt);
    auto in = blob(const_cast<void *>(send), n, dt);
    g->pg->_allgather_base(out, in)->wait();
  });
}
int pg_reduce_scatter(void *ctx, const void *send, void *recv, uint64_t n, flatshard_dtype dt,
                      flatshard_reduce_op op) {
  return guarded([&] {
    auto *g = static_cast<PG *>(ctx);
    auto in = blob(const_cast<void *>(send), n * static_cast<uint64_t>(g->pg->getSize()), dt);
    auto out = blob(recv, n, dt);
    c10d::ReduceScatterOptions o;
    o.reduceOp = to_c10d(op);
    g->pg->_reduce_scatter_base(out, in, o)->wait();
  });
}
int pg_broadcast(void *ctx, void *buf, uint64_t count, flatshard_dtype dt, int32_t root) {
  return guarded([&] {
    std::vector<at::Tensor> v{blob(buf, count, dt)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<PG *>(ctx)->pg->broadcast(v, o)->wait();
  });
}
int pg_barrier(void *ctx) {
  return guarded([&] { static_cast<PG *>(ctx)->pg->barrier()->wait(); });
}
void pg_destroy(void *ctx) { delete static_cast<PG *>(ctx); }

flatshard_tensor describe(const at::Tensor &t) {
  if (!t.is_contiguous()) throw std::invalid_argument("flatshard: tensors must be contiguous");
  if (!t.device().is_cpu()) throw std::invalid_argument("flatshard: this example takes CPU tensors");
  flatshard_tensor d{};
  d.data = t.data_ptr();
  d.grad = t.grad().defined() ? t.grad().data_ptr() : nullptr;
  d.numel = static_cast<uint64_t>(t.numel());
  d.dtype = from_torch(t.scalar_type());
  d.device.type = FLATSHARD_DEVICE_CPU;
  return d;
}

std::vector<flatshard_tensor> describe_all(const std::vector<at::Tensor> &ts) {
  std::vector<flatshard_tensor> v;
  for (auto &t : ts) v.push_back(describe(t));
  return v;
}

}  // namespace

struct Comm {
  flatshard_comm *c = nullptr;
  explicit Comm(flatshard_comm *p) : c(p) {}
  ~Comm() { flatshard_comm_free(c); }
  static std::shared_ptr<Comm> from_process_group(const c10::intrusive_ptr<c10d::ProcessGroup> &pg) {
    flatshard_collectives ops{};
    ops.struct_size = sizeof ops;
    ops.ctx = new PG{pg};
    ops.all_reduce = pg_all_reduce;
    ops.all_gather = pg_all_gather;
    ops.reduce_scatter = pg_reduce_scatter;
    ops.broadcast = pg_broadcast;
    ops.barrier = pg_barrier;
    ops.destroy = pg_destroy;
    flatshard_comm *c = nullptr;
    flatshard_status s = flatshard_comm_from_collectives(pg->getRank(), pg->getSize(), &ops, &c);
    if (s != FLATSHARD_OK) delete static_cast<PG *>(ops.ctx);
    check(s);
    return std::make_shared<Comm>(c);
  }
  int rank() const { return flatshard_comm_rank(c); }
  int size() const { return flatshard_comm_size(c); }
  void all_reduce(at::Tensor t, int op) {
    auto d = describe(t);
    check(flatshard_all_reduce(c, d.data, d.numel, d.dtype, static_cast<flatshard_reduce_op>(op)));
  }
};

struct FlatParam {
  std::shared_ptr<Comm> comm;  // keeps the communicator alive
  flatshard_flat_param *fp = nullptr;
  FlatParam(std::shared_ptr<Comm> c, const std::vector<at::Tensor> &params, bool align, int sharding)
      : comm(std::move(c)) {
    auto d = describe_all(params);
    flatshard_flat_param_options o;
    flatshard_flat_param_options_init(&o);
    o.align_params = align;
    o.sharding = static_cast<flatshard_sharding>(sharding);
    check(flatshard_flat_param_new(comm->c, d.data(), d.size(), &o, &fp));
  }
  ~FlatParam() { flatshard_flat_param_free(fp); }
  uint64_t numel() const { return flatshard_flat_param_numel(fp); }
  uint64_t padded_numel() const { return flatshard_flat_param_padded_numel(fp); }
  at::Tensor shard() {
    flatshard_tensor t;
    check(flatshard_flat_param_shard(fp, &t));
    return blob(t.data, t.numel, static_cast<flatshard_dtype>(t.dtype));
  }
  void unshard(bool writeback, bool rank0_only, bool offload, bool with_grads) {
    flatshard_unshard_options o;
    flatshard_unshard_options_init(&o);
    o.writeback = writeback;
    o.rank0_only = rank0_only;
    o.offload_to_cpu = offload;
    o.with_grads = with_grads;
    check(flatshard_flat_param_unshard(fp, &o));
  }
  // Zero-copy: valid until reshard.
  at::Tensor view(uint64_t i) {
    flatshard_tensor t;
    check(flatshard_flat_param_view(fp, i, &t));
    return blob(t.data, t.numel, static_cast<flatshard_dtype>(t.dtype));
  }
  void reshard() { check(flatshard_flat_param_reshard(fp)); }
};

struct Averager {
  std::shared_ptr<Comm> comm;
  flatshard_averager *a = nullptr;
  ~Averager() { flatshard_averager_free(a); }
  static std::shared_ptr<Averager> periodic(std::shared_ptr<Comm> c, uint64_t period, uint64_t warmup) {
    auto r = std::make_shared<Averager>();
    r->comm = c;
    check(flatshard_periodic_averager_new(c->c, period, warmup, &r->a));
    return r;
  }
  static std::shared_ptr<Averager> hierarchical(std::shared_ptr<Comm> c, std::vector<uint64_t> periods,
                                                std::vector<int32_t> sizes, uint64_t warmup) {
    auto r = std::make_shared<Averager>();
    r->comm = c;
    check(flatshard_hierarchical_averager_new(c->c, periods.data(), sizes.data(), periods.size(), warmup, &r->a));
    return r;
  }
  int step(const std::vector<at::Tensor> &params) {
    auto d = describe_all(params);
    int32_t g = 0;
    check(flatshard_averager_step(a, d.data(), d.size(), 0, &g));
    return g;
  }
  uint64_t get_step() const { return flatshard_averager_get_step(a); }
};

void average_parameters(std::shared_ptr<Comm> c, const std::vector<at::Tensor> &params) {
  auto d = describe_all(params);
  check(flatshard_average_parameters(c->c, d.data(), d.size(), 0));
}

// Collectives block; gloo's worker threads may need the GIL to free tensors,
// so every call into flatshard runs with the GIL released.
#define NOGIL py::call_guard<py::gil_scoped_release>()

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Comm, std::shared_ptr<Comm>>(m, "Comm")
      .def_static("from_process_group", &Comm::from_process_group, NOGIL)
      .def("rank", &Comm::rank, NOGIL)
      .def("size", &Comm::size, NOGIL)
      .def("all_reduce", &Comm::all_reduce, NOGIL, py::arg("tensor"), py::arg("op") = 0);
  py::class_<FlatParam, std::shared_ptr<FlatParam>>(m, "FlatParam")
      .def(py::init<std::shared_ptr<Comm>, const std::vector<at::Tensor> &, bool, int>(), NOGIL, py::arg("comm"),
           py::arg("params"), py::arg("align_params") = false, py::arg("sharding") = 0)
      .def("numel", &FlatParam::numel, NOGIL)
      .def("padded_numel", &FlatParam::padded_numel, NOGIL)
      .def("shard", &FlatParam::shard, NOGIL)
      .def("unshard", &FlatParam::unshard, NOGIL, py::arg("writeback") = false, py::arg("rank0_only") = false,
           py::arg("offload_to_cpu") = false, py::arg("with_grads") = false)
      .def("view", &FlatParam::view, NOGIL)
      .def("reshard", &FlatParam::reshard, NOGIL);
  py::class_<Averager, std::shared_ptr<Averager>>(m, "Averager")
      .def_static("periodic", &Averager::periodic, NOGIL)
      .def_static("hierarchical", &Averager::hierarchical, NOGIL)
      .def("step", &Averager::step, NOGIL)
      .def("get_step", &Averager::get_step, NOGIL);
  m.def("average_parameters", &average_parameters, NOGIL);
}
