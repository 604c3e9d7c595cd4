/* API §7 from C (run by tests/c_programs.rs, also under ASan/UBSan):
 * asynchronous collectives checked against references, the call/wait split
 * of errors, a blocking call behind queued work, prefetch training with
 * unshard_async / reduce_grads_async equal to blocking training, and work
 * handles that outlive their flat param and communicator. */
#include "fs_test.h"

#define N 4099 /* not a multiple of the world size: padding in the flat params */
#define LAYERS 3
#define STEPS 4

static flatshard_tensor cpu(float *d, uint64_t n) {
  flatshard_tensor t;
  memset(&t, 0, sizeof t);
  t.data = d;
  t.numel = n;
  t.dtype = FLATSHARD_F32;
  t.device.type = FLATSHARD_DEVICE_CPU;
  return t;
}

static void wait_free(flatshard_work *w) {
  CHECK_OK(flatshard_work_wait(w));
  flatshard_work_free(w);
}

/* Train LAYERS flat params for STEPS steps; returns their shards (malloc'd). */
static float *train(flatshard_comm *c, int rank, int prefetch, uint64_t *shard_len) {
  static float init[LAYERS][N];
  flatshard_flat_param *fp[LAYERS];
  for (int l = 0; l < LAYERS; l++) {
    for (int i = 0; i < N; i++) init[l][i] = (float)((i * 7 + l) % 31) / 31.0f;
    flatshard_tensor t = cpu(init[l], N);
    CHECK_OK(flatshard_flat_param_new(c, &t, 1, NULL, &fp[l]));
  }
  flatshard_work *w[4 * LAYERS];
  for (int step = 0; step < STEPS; step++) {
    int nw = 0;
    if (prefetch)
      for (int l = 0; l < LAYERS; l++) CHECK_OK(flatshard_flat_param_unshard_async(fp[l], NULL, &w[nw++]));
    for (int l = LAYERS - 1; l >= 0; l--) {
      if (!prefetch) CHECK_OK(flatshard_flat_param_unshard(fp[l], NULL));
      flatshard_tensor v;
      CHECK_OK(flatshard_flat_param_view(fp[l], 0, &v));
      const float *x = v.data;
      float *g = v.grad;
      for (uint64_t i = 0; i < v.numel; i++) g[i] = x[i] * 0.25f + (float)((i + (uint64_t)rank + (uint64_t)step) % 5);
      if (prefetch) {
        CHECK_OK(flatshard_flat_param_reduce_grads_async(fp[l], &w[nw++]));
      } else {
        CHECK_OK(flatshard_flat_param_reduce_grads(fp[l]));
        CHECK_OK(flatshard_flat_param_reshard(fp[l]));
      }
    }
    for (int l = 0; l < LAYERS; l++) {
      if (prefetch) CHECK_OK(flatshard_flat_param_reshard(fp[l])); /* waits for its reduction */
      flatshard_tensor s;
      CHECK_OK(flatshard_flat_param_shard(fp[l], &s));
      float *d = s.data;
      const float *g = s.grad;
      for (uint64_t i = 0; i < s.numel; i++) d[i] -= 0.1f * g[i];
      CHECK_OK(flatshard_flat_param_zero_grad(fp[l]));
    }
    for (int i = 0; i < nw; i++) wait_free(w[i]);
  }
  *shard_len = flatshard_flat_param_shard_numel(fp[0]);
  float *out = malloc(sizeof(float) * LAYERS * *shard_len);
  CHECK(out != NULL, "malloc");
  for (int l = 0; l < LAYERS; l++) {
    flatshard_tensor s;
    CHECK_OK(flatshard_flat_param_shard(fp[l], &s));
    memcpy(out + (size_t)l * *shard_len, s.data, sizeof(float) * *shard_len);
    flatshard_flat_param_free(fp[l]);
  }
  return out;
}

int main(void) {
  flatshard_comm_options o;
  flatshard_comm_options_init(&o);
  const char *t = getenv("FS_TEST_TRANSPORT");
  if (t && strcmp(t, "tcp") == 0) o.transport = FLATSHARD_TRANSPORT_TCP;
  flatshard_comm *c;
  CHECK_OK(flatshard_comm_init_from_env(&o, &c));
  int rank = flatshard_comm_rank(c), world = flatshard_comm_size(c);
  g_rank = rank;

  /* call errors come from the call, *out untouched */
  flatshard_work *w = (flatshard_work *)&o, *w2;
  float b[N];
  EXPECT_STATUS(flatshard_all_reduce_async(c, NULL, N, FLATSHARD_F32, FLATSHARD_SUM, &w), FLATSHARD_ERR_INVALID_ARGUMENT);
  EXPECT_STATUS(flatshard_broadcast_async(c, b, N, FLATSHARD_F32, world, &w), FLATSHARD_ERR_INVALID_ARGUMENT);
  CHECK(w == (flatshard_work *)&o, "out written on error");
  EXPECT_STATUS(flatshard_work_test(NULL, NULL), FLATSHARD_ERR_INVALID_ARGUMENT);
  flatshard_work_free(NULL);

  /* queued collectives, then a blocking one behind them */
  float g[N * 4];
  for (int i = 0; i < N; i++) b[i] = (float)(i % 11 + rank);
  CHECK_OK(flatshard_all_reduce_async(c, b, N, FLATSHARD_F32, FLATSHARD_AVG, &w));
  float mine[8];
  for (int i = 0; i < 8; i++) mine[i] = (float)(rank * 8 + i);
  CHECK_OK(flatshard_all_gather_async(c, mine, g, 8, FLATSHARD_F32, &w2));
  int64_t one = 1;
  CHECK_OK(flatshard_all_reduce(c, &one, 1, FLATSHARD_I64, FLATSHARD_SUM));
  int32_t done = 0;
  CHECK_OK(flatshard_work_test(w, &done));
  CHECK(done == 1, "queued work not finished after a later blocking call");
  wait_free(w);
  wait_free(w2);
  CHECK(one == world, "blocking sum %lld", (long long)one);
  for (int i = 0; i < N; i++) {
    float want = (float)(i % 11) + (float)(world - 1) / 2.0f;
    CHECK(b[i] == want, "avg[%d] = %f, want %f", i, (double)b[i], (double)want);
  }
  for (int i = 0; i < 8 * world; i++) CHECK(g[i] == (float)i, "gather[%d] = %f", i, (double)g[i]);

  /* prefetch training equals blocking training, bit for bit */
  uint64_t len = 0;
  float *a = train(c, rank, 0, &len);
  float *p = train(c, rank, 1, &len);
  CHECK(memcmp(a, p, sizeof(float) * LAYERS * len) == 0, "prefetch training differs from blocking training");
  free(a);
  free(p);

  /* work handles outlive their flat param and communicator */
  static float layer[N];
  flatshard_tensor tt = cpu(layer, N);
  flatshard_flat_param *fp;
  CHECK_OK(flatshard_flat_param_new(c, &tt, 1, NULL, &fp));
  CHECK_OK(flatshard_flat_param_unshard_async(fp, NULL, &w));
  CHECK_OK(flatshard_broadcast_async(c, b, N, FLATSHARD_F32, 0, &w2));
  flatshard_flat_param_free(fp);
  flatshard_comm_free(c);
  wait_free(w);
  wait_free(w2);
  if (rank == 0) printf("async OK: %d ranks\n", world);
  return 0;
}
