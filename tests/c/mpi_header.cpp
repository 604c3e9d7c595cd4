// include/flatshard_mpi.h from C++ (built by tests/mpi.rs with each MPI's
// mpicxx): both entry points, one all_reduce each, then free before
// MPI_Finalize.
#include "flatshard_mpi.h"

#include <cstdio>
#include <vector>

static int check(flatshard_status s, const char *what) {
  if (s != FLATSHARD_OK) {
    std::fprintf(stderr, "%s: %s: %s\n", what, flatshard_status_name(s), flatshard_last_error());
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int bad = 0;
  for (int mode = 0; mode < 2; mode++) {
    flatshard_comm *c = nullptr;
    bad |= check(mode ? flatshard_comm_from_mpi(MPI_COMM_WORLD, &c) : flatshard_comm_init_mpi(MPI_COMM_WORLD, nullptr, &c), "init");
    if (c == nullptr) break;
    int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
    std::vector<double> v(5, r + 1.0);
    bad |= check(flatshard_all_reduce(c, v.data(), v.size(), FLATSHARD_F64, FLATSHARD_SUM), "all_reduce");
    for (double x : v) bad |= x != w * (w + 1) / 2.0;
    flatshard_comm_free(c);
    if (!bad) std::printf("mpi_header.cpp: rank %d of %d ok (%s)\n", r, w, mode ? "from_mpi" : "init_mpi");
  }
  MPI_Finalize();
  return bad;
}
