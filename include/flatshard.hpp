/*
 * flatshard.hpp: header-only C++17 RAII wrapper over flatshard.h.
 *
 * - Handles are move-only classes that free themselves (Comm, FlatParam, Averager,
 *   Checkpoint, Work: one asynchronous operation).
 * - Every failing call throws flatshard::Error carrying the status and the
 *   library's message (flatshard_last_error()).
 * - Tensors are described with flatshard::cpu_tensor(ptr, n) / Span<T>.
 *
 * Lifetimes follow the C API: a Comm must outlive the FlatParams and Averagers
 * built on it (destroy them first, as with NCCL communicators).
 */
#ifndef FLATSHARD_HPP
#define FLATSHARD_HPP

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "flatshard.h"

namespace flatshard {

/** A failed flatshard call: status() + what() (the library's message). */
class Error : public std::runtime_error {
 public:
  Error(flatshard_status s, const std::string &msg)
      : std::runtime_error(std::string(flatshard_status_name(s)) + ": " + msg), status_(s) {}
  flatshard_status status() const noexcept { return status_; }

 private:
  flatshard_status status_;
};

inline void check(flatshard_status s) {
  if (s != FLATSHARD_OK) throw Error(s, flatshard_last_error());
}

/** A contiguous view of caller memory (C++20 std::span in miniature). */
template <typename T>
struct Span {
  T *data = nullptr;
  std::size_t size = 0;
  Span() = default;
  Span(T *d, std::size_t n) : data(d), size(n) {}
  template <typename C>
  Span(C &c) : data(c.data()), size(c.size()) {}  // NOLINT: implicit from containers
  T *begin() const { return data; }
  T *end() const { return data + size; }
  T &operator[](std::size_t i) const { return data[i]; }
};

template <typename T>
constexpr flatshard_dtype dtype_of() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    std::is_same<T, int32_t>::value || std::is_same<T, int64_t>::value ||
                    std::is_same<T, uint8_t>::value,
                "use the flatshard_dtype overloads for f16/bf16");
  return std::is_same<T, float>::value     ? FLATSHARD_F32
         : std::is_same<T, double>::value  ? FLATSHARD_F64
         : std::is_same<T, int32_t>::value ? FLATSHARD_I32
         : std::is_same<T, int64_t>::value ? FLATSHARD_I64
                                           : FLATSHARD_U8;
}

/** Describe host memory as a flatshard_tensor (grad optional). */
template <typename T>
flatshard_tensor cpu_tensor(T *data, std::size_t numel, T *grad = nullptr) {
  flatshard_tensor t{};
  t.data = const_cast<typename std::remove_const<T>::type *>(data);
  t.grad = grad;
  t.numel = numel;
  t.dtype = dtype_of<typename std::remove_const<T>::type>();
  t.device.type = FLATSHARD_DEVICE_CPU;
  t.device.index = 0;
  return t;
}

namespace detail {
/** Owns one C handle and frees it with `Free`; move-only. */
template <typename T, void (*Free)(T *)>
class Owned {
 public:
  Owned() = default;
  explicit Owned(T *p) : p_(p) {}
  Owned(Owned &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  Owned &operator=(Owned &&o) noexcept {
    if (this != &o) {
      Free(p_);
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  Owned(const Owned &) = delete;
  Owned &operator=(const Owned &) = delete;
  ~Owned() { Free(p_); }
  T *get() const { return p_; }
  T **out() { return &p_; } /* for a C out-param, while empty */

 private:
  T *p_ = nullptr;
};
}  // namespace detail

/**
 * One queued asynchronous operation (API §7; owning, move-only). wait()
 * throws the operation's error; destroying a Work that is still in flight
 * waits for it (its status is then dropped). Valid after its Comm or
 * FlatParam is gone. Use from one thread at a time.
 */
class Work {
 public:
  Work() = default;
  explicit Work(flatshard_work *w) : w_(w) {}
  /** Block until done; throws flatshard::Error if the operation failed. */
  void wait() { check(flatshard_work_wait(w_.get())); }
  /** Never blocks: false while in flight; true once done (throws if it failed). */
  bool test() {
    int32_t done = 0;
    check(flatshard_work_test(w_.get(), &done));
    return done != 0;
  }
  /** CUDA: `stream` waits for the work, the host does not (host work: wait()). */
  void wait_stream(void *cuda_stream) { check(flatshard_work_wait_stream(w_.get(), cuda_stream)); }
  flatshard_work *get() const { return w_.get(); }
  explicit operator bool() const { return w_.get() != nullptr; }

 private:
  detail::Owned<flatshard_work, flatshard_work_free> w_;
};

/** A communicator (owning, move-only). */
class Comm {
 public:
  Comm() = default;
  explicit Comm(flatshard_comm *c) : c_(c) {}
  /** torchrun environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). */
  static Comm from_env(const flatshard_comm_options *o = nullptr) {
    flatshard_comm *c = nullptr;
    check(flatshard_comm_init_from_env(o, &c));
    return Comm(c);
  }
  static Comm init(const std::string &addr, uint16_t port, int rank, int world,
                   const flatshard_comm_options *o = nullptr) {
    flatshard_comm *c = nullptr;
    check(flatshard_comm_init(addr.c_str(), port, rank, world, o, &c));
    return Comm(c);
  }

  int rank() const { return flatshard_comm_rank(c_.get()); }
  int size() const { return flatshard_comm_size(c_.get()); }
  flatshard_comm *get() const { return c_.get(); }
  explicit operator bool() const { return c_.get() != nullptr; }

  template <typename T>
  void all_reduce(Span<T> buf, flatshard_reduce_op op = FLATSHARD_SUM) {
    check(flatshard_all_reduce(c_.get(), buf.data, buf.size, dtype_of<T>(), op));
  }
  template <typename T>
  void all_gather(Span<const T> send, Span<T> recv) {
    check(flatshard_all_gather(c_.get(), send.data, recv.data, send.size, dtype_of<T>()));
  }
  template <typename T>
  void reduce_scatter(Span<const T> send, Span<T> recv, flatshard_reduce_op op = FLATSHARD_SUM) {
    check(flatshard_reduce_scatter(c_.get(), send.data, recv.data, recv.size, dtype_of<T>(), op));
  }
  template <typename T>
  void broadcast(Span<T> buf, int root) {
    check(flatshard_broadcast(c_.get(), buf.data, buf.size, dtype_of<T>(), root));
  }
  /** Asynchronous forms (API §7): the buffers belong to the library until the Work is done. */
  template <typename T>
  Work all_reduce_async(Span<T> buf, flatshard_reduce_op op = FLATSHARD_SUM) {
    flatshard_work *w = nullptr;
    check(flatshard_all_reduce_async(c_.get(), buf.data, buf.size, dtype_of<T>(), op, &w));
    return Work(w);
  }
  template <typename T>
  Work all_gather_async(Span<const T> send, Span<T> recv) {
    flatshard_work *w = nullptr;
    check(flatshard_all_gather_async(c_.get(), send.data, recv.data, send.size, dtype_of<T>(), &w));
    return Work(w);
  }
  template <typename T>
  Work reduce_scatter_async(Span<const T> send, Span<T> recv, flatshard_reduce_op op = FLATSHARD_SUM) {
    flatshard_work *w = nullptr;
    check(flatshard_reduce_scatter_async(c_.get(), send.data, recv.data, recv.size, dtype_of<T>(), op, &w));
    return Work(w);
  }
  template <typename T>
  Work broadcast_async(Span<T> buf, int root) {
    flatshard_work *w = nullptr;
    check(flatshard_broadcast_async(c_.get(), buf.data, buf.size, dtype_of<T>(), root, &w));
    return Work(w);
  }
  void barrier() { check(flatshard_barrier(c_.get())); }
  void abort() { check(flatshard_comm_abort(c_.get())); }
  /** Contiguous blocks of group_size ranks. */
  Comm new_subgroups(int group_size) {
    flatshard_comm *c = nullptr;
    check(flatshard_comm_new_subgroups(c_.get(), group_size, &c));
    return Comm(c);
  }
  /** MPI_Comm_split; an empty Comm (operator bool false) for color < 0. */
  Comm split(int color, int key) {
    flatshard_comm *c = nullptr;
    check(flatshard_comm_split(c_.get(), color, key, &c));
    return Comm(c);
  }

 private:
  detail::Owned<flatshard_comm, flatshard_comm_free> c_;
};

/** One FSDP flat parameter (owning, move-only). */
class FlatParam {
 public:
  FlatParam(Comm &comm, const std::vector<flatshard_tensor> &params,
            const flatshard_flat_param_options *o = nullptr) {
    check(flatshard_flat_param_new(comm.get(), params.data(), params.size(), o, fp_.out()));
  }

  uint64_t numel() const { return flatshard_flat_param_numel(fp_.get()); }
  uint64_t padded_numel() const { return flatshard_flat_param_padded_numel(fp_.get()); }
  uint64_t shard_numel() const { return flatshard_flat_param_shard_numel(fp_.get()); }
  flatshard_tensor shard() {
    flatshard_tensor t;
    check(flatshard_flat_param_shard(fp_.get(), &t));
    return t;
  }
  void unshard(const flatshard_unshard_options *o = nullptr) { check(flatshard_flat_param_unshard(fp_.get(), o)); }
  /** A training unshard for a forward pass: no gradient buffer (views' grad NULL). */
  void unshard_forward() { check(flatshard_flat_param_unshard_forward(fp_.get())); }
  flatshard_tensor view(uint64_t i) {
    flatshard_tensor t;
    check(flatshard_flat_param_view(fp_.get(), i, &t));
    return t;
  }
  void reshard() { check(flatshard_flat_param_reshard(fp_.get())); }
  void reduce_grads() { check(flatshard_flat_param_reduce_grads(fp_.get())); }
  /** Prefetch: the flat param counts as unsharded at once; view() waits for the gather. */
  Work unshard_async(const flatshard_unshard_options *o = nullptr) {
    flatshard_work *w = nullptr;
    check(flatshard_flat_param_unshard_async(fp_.get(), o, &w));
    return Work(w);
  }
  Work unshard_forward_async() {
    flatshard_work *w = nullptr;
    check(flatshard_flat_param_unshard_forward_async(fp_.get(), &w));
    return Work(w);
  }
  /** Overlap the gradient reduce-scatter with the rest of backward. */
  Work reduce_grads_async() {
    flatshard_work *w = nullptr;
    check(flatshard_flat_param_reduce_grads_async(fp_.get(), &w));
    return Work(w);
  }
  void zero_grad() { check(flatshard_flat_param_zero_grad(fp_.get())); }
  // zero_grad(set_to_none=True): shard().grad is NULL until the next reduce_grads.
  void drop_grad() { check(flatshard_flat_param_drop_grad(fp_.get())); }
  flatshard_flat_param *get() const { return fp_.get(); }

 private:
  detail::Owned<flatshard_flat_param, flatshard_flat_param_free> fp_;
};

/** Unshard for a scope (summon_full_params); reshards on exit. */
class Unsharded {
 public:
  Unsharded(FlatParam &fp, const flatshard_unshard_options *o = nullptr) : fp_(fp) { fp_.unshard(o); }
  ~Unsharded() noexcept(false) {
    if (std::uncaught_exceptions() == 0) fp_.reshard();
    else flatshard_flat_param_reshard(fp_.get());
  }
  Unsharded(const Unsharded &) = delete;
  Unsharded &operator=(const Unsharded &) = delete;

 private:
  FlatParam &fp_;
};

/** A periodic or hierarchical model averager (owning, move-only). */
class Averager {
 public:
  static Averager periodic(Comm &comm, uint64_t period, uint64_t warmup) {
    flatshard_averager *a = nullptr;
    check(flatshard_periodic_averager_new(comm.get(), period, warmup, &a));
    return Averager(a);
  }
  static Averager hierarchical(Comm &comm, const std::vector<std::pair<uint64_t, int32_t>> &period_to_group,
                               uint64_t warmup) {
    std::vector<uint64_t> p;
    std::vector<int32_t> g;
    for (auto &kv : period_to_group) {
      p.push_back(kv.first);
      g.push_back(kv.second);
    }
    flatshard_averager *a = nullptr;
    check(flatshard_hierarchical_averager_new(comm.get(), p.data(), g.data(), p.size(), warmup, &a));
    return Averager(a);
  }

  /** Returns the size of the group that averaged (0 if none). */
  int step(std::vector<flatshard_tensor> &params, uint32_t flags = 0) {
    int32_t g = 0;
    check(flatshard_averager_step(a_.get(), params.data(), params.size(), flags, &g));
    return g;
  }
  uint64_t get_step() const { return flatshard_averager_get_step(a_.get()); }
  void set_step(uint64_t s) { check(flatshard_averager_set_step(a_.get(), s)); }

 private:
  explicit Averager(flatshard_averager *a) : a_(a) {}
  detail::Owned<flatshard_averager, flatshard_averager_free> a_;
};

/** A tensor's name and shape in a checkpoint (owning). */
struct ParamInfo {
  std::string name;
  std::vector<uint64_t> shape;
};

/**
 * One checkpoint save or load (owning, move-only), API section 8. Every call is
 * collective over the comm it was begun on. A save that is not committed is
 * discarded when the Checkpoint is destroyed.
 *
 *   auto ck = flatshard::Checkpoint::save(comm, "ckpt/step100");
 *   ck.save_flat_param(layer, {{"l.weight", {7, 3}}, {"l.bias", {7}}});
 *   ck.commit();
 */
class Checkpoint {
 public:
  static Checkpoint save(Comm &comm, const std::string &dir) {
    flatshard_checkpoint *c = nullptr;
    check(flatshard_checkpoint_save_begin(comm.get(), dir.c_str(), &c));
    return Checkpoint(c);
  }
  static Checkpoint load(Comm &comm, const std::string &dir) {
    flatshard_checkpoint *c = nullptr;
    check(flatshard_checkpoint_load_begin(comm.get(), dir.c_str(), &c));
    return Checkpoint(c);
  }
  /** The shard (shard_data null) or a shard-shaped buffer such as an optimizer moment. */
  void save_flat_param(FlatParam &fp, const std::vector<ParamInfo> &infos, const char *prefix = nullptr,
                       const void *shard_data = nullptr) {
    auto c = c_infos(infos);
    check(flatshard_checkpoint_save_flat_param(ck_.get(), fp.get(), c.data(), c.size(), prefix, shard_data));
  }
  /** A tensor every rank holds identically (rank 0 writes it). */
  void save_tensor(const ParamInfo &info, const flatshard_tensor &t) {
    auto c = c_infos({info});
    check(flatshard_checkpoint_save_tensor(ck_.get(), c.data(), &t));
  }
  void commit() { check(flatshard_checkpoint_commit(ck_.get())); }
  void load_flat_param(FlatParam &fp, const std::vector<ParamInfo> &infos, const char *prefix = nullptr,
                       void *shard_data = nullptr) {
    auto c = c_infos(infos);
    check(flatshard_checkpoint_load_flat_param(ck_.get(), fp.get(), c.data(), c.size(), prefix, shard_data));
  }
  void load_tensor(const ParamInfo &info, flatshard_tensor t) {
    auto c = c_infos({info});
    check(flatshard_checkpoint_load_tensor(ck_.get(), c.data(), &t));
  }
  /** Hugging Face files (model-0000k-of-0000N.safetensors + index) from a saved checkpoint. */
  static void consolidate(Comm &comm, const std::string &src, const std::string &dst, uint64_t max_file_bytes = 0) {
    check(flatshard_checkpoint_consolidate(comm.get(), src.c_str(), dst.c_str(), max_file_bytes));
  }
  flatshard_checkpoint *get() const { return ck_.get(); }

 private:
  explicit Checkpoint(flatshard_checkpoint *c) : ck_(c) {}
  /* Views of `infos` (which outlive the call that uses them). */
  static std::vector<flatshard_param_info> c_infos(const std::vector<ParamInfo> &infos) {
    std::vector<flatshard_param_info> out;
    for (auto &i : infos) out.push_back({i.name.c_str(), static_cast<uint32_t>(i.shape.size()), i.shape.data()});
    return out;
  }
  detail::Owned<flatshard_checkpoint, flatshard_checkpoint_free> ck_;
};

/** In-place mean of `params` over `comm` (bounded extra memory). */
inline void average_parameters(Comm &comm, std::vector<flatshard_tensor> &params, uint32_t flags = 0) {
  check(flatshard_average_parameters(comm.get(), params.data(), params.size(), flags));
}

}  // namespace flatshard

#endif  // FLATSHARD_HPP
