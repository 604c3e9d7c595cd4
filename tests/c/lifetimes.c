/* Ownership: a communicator handle may be freed before the flat params and
 * averagers built on it (and before the subgroup an averager created); they
 * hold their own references and keep working. The communicator closes when
 * its last user is freed. Run on 2 ranks, also under valgrind memcheck. */
#include "fs_test.h"

int main(void) {
  flatshard_comm *c = join(60000);
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);

  /* A flat param of two params (7 + 5 floats); rank r starts from value r. */
  float a[7], b[5];
  for (int i = 0; i < 7; i++) a[i] = (float)(r * 100 + i);
  for (int i = 0; i < 5; i++) b[i] = (float)(r * 100 + 50 + i);
  flatshard_tensor ps[2] = {
      {a, NULL, 7, FLATSHARD_F32, {FLATSHARD_DEVICE_CPU, 0}},
      {b, NULL, 5, FLATSHARD_F32, {FLATSHARD_DEVICE_CPU, 0}},
  };
  flatshard_flat_param_options fo;
  flatshard_flat_param_options_init(&fo);
  fo.sync_from_rank0 = 1;
  flatshard_flat_param *fp = NULL;
  CHECK_OK(flatshard_flat_param_new(c, ps, 2, &fo, &fp));

  flatshard_averager *avg = NULL;
  CHECK_OK(flatshard_periodic_averager_new(c, 1, 0, &avg));
  uint64_t periods[1] = {1};
  int32_t sizes[1] = {(int32_t)w};
  flatshard_averager *hier = NULL;
  CHECK_OK(flatshard_hierarchical_averager_new(c, periods, sizes, 1, 0, &hier));

  /* The caller is done with its handle: its users keep the communicator. */
  flatshard_comm_free(c);
  c = NULL;

  /* The flat param still gathers: rank 0's initial values everywhere. */
  flatshard_unshard_options uo;
  flatshard_unshard_options_init(&uo);
  CHECK_OK(flatshard_flat_param_unshard(fp, &uo));
  flatshard_tensor v;
  CHECK_OK(flatshard_flat_param_view(fp, 1, &v));
  CHECK(v.numel == 5 && ((float *)v.data)[2] == 52.0f, "view 1 elem 2: %g", ((float *)v.data)[2]);
  /* Training: gradient r+1 everywhere → mean (w+1)/2 in the shard grad. */
  for (uint64_t i = 0; i < v.numel; i++) ((float *)v.grad)[i] = (float)(r + 1);
  CHECK_OK(flatshard_flat_param_view(fp, 0, &v));
  for (uint64_t i = 0; i < v.numel; i++) ((float *)v.grad)[i] = (float)(r + 1);
  CHECK_OK(flatshard_flat_param_reduce_grads(fp));
  CHECK_OK(flatshard_flat_param_reshard(fp));
  flatshard_tensor s;
  CHECK_OK(flatshard_flat_param_shard(fp, &s));
  float want = (float)(w + 1) / 2.0f;
  for (uint64_t i = 0; i < s.numel; i++) {
    uint64_t flat = (uint64_t)r * s.numel + i;
    if (flat < 12) CHECK(((float *)s.grad)[i] == want, "shard grad %llu: %g, want %g", (unsigned long long)i, ((float *)s.grad)[i], want);
  }

  /* Both averagers still average over the freed handle's communicator. */
  float x[3] = {(float)r, (float)r, (float)r};
  flatshard_tensor xt = {x, NULL, 3, FLATSHARD_F32, {FLATSHARD_DEVICE_CPU, 0}};
  int32_t g = -1;
  CHECK_OK(flatshard_averager_step(avg, &xt, 1, 0, &g));
  CHECK(g == w && x[1] == (float)(w - 1) / 2.0f, "periodic: group %d, x %g", g, x[1]);
  x[0] = x[1] = x[2] = (float)r;
  CHECK_OK(flatshard_averager_step(hier, &xt, 1, 0, &g));
  CHECK(g == w && x[2] == (float)(w - 1) / 2.0f, "hierarchical: group %d, x %g", g, x[2]);

  /* Last users go in any order; the communicator closes with the last. */
  flatshard_averager_free(avg);
  flatshard_flat_param_free(fp);
  flatshard_averager_free(hier);
  printf("rank %d: lifetimes OK\n", r);
  return 0;
}
