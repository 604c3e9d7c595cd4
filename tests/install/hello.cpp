// Built with CMake's find_package(flatshard) against an installed flatshard.
#include <flatshard.hpp>
#include <cstdio>
#include <vector>

int main() try {
  auto comm = flatshard::Comm::init("127.0.0.1", 0, 0, 1);
  std::vector<double> v{1.5, 2.5};
  comm.all_reduce(flatshard::Span<double>(v));
  std::printf("C++ rank %d/%d v0=%.1f\n", comm.rank(), comm.size(), v[0]);
  return v[0] == 1.5 ? 0 : 1;
} catch (const flatshard::Error &e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
