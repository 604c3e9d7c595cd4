// C++17 example over flatshard.hpp: shard a layer, edit it under a scoped
// unshard with writeback, prefetch with unshard_async (flatshard::Work),
// overlap a gradient reduction, average a replicated tensor, and save and
// reload a sharded checkpoint (directory argv[1], default ./cpp_example_ckpt).
// Run: flatshard-run -n 2 -- ./cpp_example
#include <cstdio>
#include <string>
#include <vector>

#include "flatshard.hpp"

int main(int argc, char **argv) try {
  auto comm = flatshard::Comm::from_env();
  const int rank = comm.rank(), world = comm.size();

  std::vector<float> weight(7 * 3, 1.0f), bias(7, 0.5f);
  flatshard::FlatParam layer(comm, {flatshard::cpu_tensor(weight.data(), weight.size()),
                                    flatshard::cpu_tensor(bias.data(), bias.size())});
  flatshard_unshard_options wb;
  flatshard_unshard_options_init(&wb);
  wb.writeback = 1;
  {
    flatshard::Unsharded full(layer, &wb);
    auto w = layer.view(0);
    static_cast<float *>(w.data)[0] = 42.0f;  // edit persists through writeback
  }
  {
    flatshard::Unsharded full(layer);
    float w0 = static_cast<float *>(layer.view(0).data)[0];
    if (w0 != 42.0f) throw std::runtime_error("writeback lost the edit");
  }

  // Asynchronous operations (API §7): a Work is move-only and waits when it
  // goes out of scope; view() waits for the prefetched gather by itself.
  {
    flatshard::Work gather = layer.unshard_async();
    std::vector<float> mine(3, static_cast<float>(rank + 1));
    flatshard::Work sum = comm.all_reduce_async(flatshard::Span<float>(mine));  // queued behind the gather
    auto w = layer.view(0);                                                    // waits for the gather
    if (static_cast<float *>(w.data)[0] != 42.0f) throw std::runtime_error("unshard_async lost the edit");
    static_cast<float *>(w.grad)[0] = 1.0f;
    flatshard::Work grads = layer.reduce_grads_async();
    sum.wait();
    if (mine[0] != world * (world + 1) / 2.0f) throw std::runtime_error("all_reduce_async gave the wrong sum");
    flatshard::Work moved = std::move(grads);  // move-only: `grads` is now empty
    if (grads) throw std::runtime_error("a moved-from Work still owns its handle");
    moved.wait();
    layer.reshard();
  }

  std::vector<float> head(4, static_cast<float>(rank));
  std::vector<flatshard_tensor> params{flatshard::cpu_tensor(head.data(), head.size())};
  flatshard::average_parameters(comm, params);
  float want = (world - 1) / 2.0f;
  if (head[0] != want) throw std::runtime_error("average_parameters gave the wrong mean");

  // Checkpoint: save the sharded layer, load it into a fresh one.
  const std::string dir = argc > 1 ? argv[1] : "cpp_example_ckpt";
  const std::vector<flatshard::ParamInfo> infos{{"layer.weight", {7, 3}}, {"layer.bias", {7}}};
  {
    auto ck = flatshard::Checkpoint::save(comm, dir);
    ck.save_flat_param(layer, infos);
    ck.commit();
  }
  std::vector<float> zw(7 * 3, 0.0f), zb(7, 0.0f);
  flatshard::FlatParam fresh(comm, {flatshard::cpu_tensor(zw.data(), zw.size()), flatshard::cpu_tensor(zb.data(), zb.size())});
  flatshard::Checkpoint::load(comm, dir).load_flat_param(fresh, infos);
  {
    flatshard::Unsharded full(fresh);
    if (static_cast<float *>(fresh.view(0).data)[0] != 42.0f || static_cast<float *>(fresh.view(1).data)[6] != 0.5f)
      throw std::runtime_error("checkpoint round trip lost values");
  }

  comm.barrier();
  if (rank == 0)
    std::printf("C++ example OK: %d ranks, flat param of %llu elements (%llu per rank), mean %.1f\n", world,
                static_cast<unsigned long long>(layer.numel()),
                static_cast<unsigned long long>(layer.shard_numel()), head[0]);
  return 0;
} catch (const flatshard::Error &e) {
  std::fprintf(stderr, "flatshard error (%d): %s\n", static_cast<int>(e.status()), e.what());
  return 1;
}
