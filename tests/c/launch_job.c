/* One job for the launcher tests (tests/torchrun.rs, tests/mpi.rs,
 * tests/slurm_env.rs): collectives with verified results, a flat parameter
 * (FULL_SHARD: sync from rank 0, unshard, gradients, reduce_grads, reshard)
 * and model averaging (average_parameters and a periodic averager). Every
 * value is a small dyadic fraction, so sums are exact in any order and every
 * transport must give the same bits. Each rank prints
 *   launch_job: rank R of W ok, restart N, hash H
 * where H hashes every result this rank holds (compared across transports).
 *
 * Built three ways:
 *   cc  tests/c/launch_job.c            join with flatshard_comm_init_from_env
 *   mpicc -DLAUNCH_JOB_MPI ...          argv[1] = init_mpi | from_mpi
 * LAUNCH_JOB_DIE_RANK=r: on the first attempt (TORCHELASTIC_RESTART_COUNT 0
 * or unset) rank r kills itself with SIGKILL after the first collective. */
#ifdef LAUNCH_JOB_MPI
#include "flatshard_mpi.h"
#else
#define _POSIX_C_SOURCE 200809L
#endif
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flatshard.h"

static int g_rank = -1;

#define OK(call)                                                                        \
  do {                                                                                  \
    flatshard_status st_ = (call);                                                      \
    if (st_ != FLATSHARD_OK) {                                                          \
      fprintf(stderr, "launch_job rank %d: %s failed: %s: %s\n", g_rank, #call,         \
              flatshard_status_name(st_), flatshard_last_error());                      \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

#define CHECK(cond, ...)                                                                \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      fprintf(stderr, "launch_job rank %d: line %d: %s: ", g_rank, __LINE__, #cond);    \
      fprintf(stderr, __VA_ARGS__);                                                     \
      fputc('\n', stderr);                                                              \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

static uint64_t g_hash = 1469598103934665603ull; /* FNV-1a 64 */
static void mix(const void *p, size_t n) {
  const unsigned char *b = (const unsigned char *)p;
  size_t i;
  for (i = 0; i < n; i++) g_hash = (g_hash ^ b[i]) * 1099511628211ull;
}

static uint16_t f16_of_int(int v) { /* exact small integers 0..2047 */
  int e = 0;
  unsigned m;
  if (v == 0) return 0;
  while ((v >> e) > 1) e++;
  m = (unsigned)(v << (10 - e)) & 0x3ffu;
  return (uint16_t)(((unsigned)(e + 15) << 10) | m);
}

static int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}

int main(int argc, char **argv) {
  flatshard_comm *c = NULL;
  int r, w, i, restart = env_int("TORCHELASTIC_RESTART_COUNT", 0);
  const char *mode = "env";
#ifdef LAUNCH_JOB_MPI
  MPI_Init(&argc, &argv);
  mode = argc > 1 ? argv[1] : "init_mpi";
  if (strcmp(mode, "from_mpi") == 0)
    OK(flatshard_comm_from_mpi(MPI_COMM_WORLD, &c));
  else
    OK(flatshard_comm_init_mpi(MPI_COMM_WORLD, NULL, &c));
#else
  (void)argc;
  (void)argv;
  OK(flatshard_comm_init_from_env(NULL, &c));
#endif
  r = g_rank = flatshard_comm_rank(c);
  w = flatshard_comm_size(c);

  /* collectives */
  {
    enum { N = 1000 };
    float f[N], rs_in[16 * 8], rs_out[8];
    int32_t mx[3];
    uint16_t h[5];
    double mine[3], all[3 * 64];
    int64_t b[4];
    CHECK(w <= 64 && w <= 16, "world %d too big for this test", w);
    for (i = 0; i < N; i++) f[i] = (float)((r + 1) * (i % 7)) * 0.25f;
    OK(flatshard_all_reduce(c, f, N, FLATSHARD_F32, FLATSHARD_SUM));
    for (i = 0; i < N; i++) {
      float want = (float)(w * (w + 1) / 2 * (i % 7)) * 0.25f;
      CHECK(f[i] == want, "all_reduce f32[%d] = %g, want %g", i, f[i], want);
    }
    mix(f, sizeof f);
    if (env_int("LAUNCH_JOB_DIE_RANK", -1) == r && restart == 0) {
      fprintf(stderr, "launch_job rank %d: killing myself (attempt %d)\n", r, restart);
      fflush(stderr);
      raise(SIGKILL);
    }
    mx[0] = r;
    mx[1] = -r;
    mx[2] = 7;
    OK(flatshard_all_reduce(c, mx, 3, FLATSHARD_I32, FLATSHARD_MAX));
    CHECK(mx[0] == w - 1 && mx[1] == 0 && mx[2] == 7, "max %d %d %d", mx[0], mx[1], mx[2]);
    mix(mx, sizeof mx);
    for (i = 0; i < 5; i++) h[i] = f16_of_int(r + i);
    OK(flatshard_all_reduce(c, h, 5, FLATSHARD_F16, FLATSHARD_SUM));
    for (i = 0; i < 5; i++) CHECK(h[i] == f16_of_int(w * (w - 1) / 2 + w * i), "f16 sum[%d] = 0x%04x", i, h[i]);
    mix(h, sizeof h);
    for (i = 0; i < 3; i++) mine[i] = r * 10 + i + 0.5;
    OK(flatshard_all_gather(c, mine, all, 3, FLATSHARD_F64));
    for (i = 0; i < 3 * w; i++) CHECK(all[i] == (i / 3) * 10 + (i % 3) + 0.5, "all_gather[%d] = %g", i, all[i]);
    mix(all, sizeof(double) * 3 * (size_t)w);
    for (i = 0; i < 8 * w; i++) rs_in[i] = (float)(i * (r + 1)) / 8.0f;
    OK(flatshard_reduce_scatter(c, rs_in, rs_out, 8, FLATSHARD_F32, FLATSHARD_AVG));
    for (i = 0; i < 8; i++) {
      float want = (float)((r * 8 + i) * (w + 1)) / 16.0f;
      CHECK(rs_out[i] == want, "reduce_scatter avg[%d] = %g, want %g", i, rs_out[i], want);
    }
    mix(rs_out, sizeof rs_out);
    for (i = 0; i < 4; i++) b[i] = r == w - 1 ? 1000 + i : -1;
    OK(flatshard_broadcast(c, b, 4, FLATSHARD_I64, w - 1));
    for (i = 0; i < 4; i++) CHECK(b[i] == 1000 + i, "broadcast[%d] = %lld", i, (long long)b[i]);
    mix(b, sizeof b);
    OK(flatshard_barrier(c));
  }

  /* flat parameter: FULL_SHARD, sync from rank 0, one training step's grads */
  {
    enum { A = 10, B = 33, C = 7 };
    float pa[A], pb[B], pc[C];
    flatshard_tensor t[3];
    flatshard_flat_param_options fo;
    flatshard_flat_param *fp = NULL;
    flatshard_tensor v, shard;
    uint64_t k, j, numels[3] = {A, B, C};
    for (i = 0; i < A; i++) pa[i] = (float)(i + 100 * r) / 4.0f;
    for (i = 0; i < B; i++) pb[i] = (float)(-i - 100 * r) / 2.0f;
    for (i = 0; i < C; i++) pc[i] = (float)(i * i + r);
    memset(t, 0, sizeof t);
    t[0].data = pa; t[1].data = pb; t[2].data = pc;
    for (k = 0; k < 3; k++) {
      t[k].numel = numels[k];
      t[k].dtype = FLATSHARD_F32;
      t[k].device.type = FLATSHARD_DEVICE_CPU;
    }
    flatshard_flat_param_options_init(&fo);
    fo.sync_from_rank0 = 1;
    OK(flatshard_flat_param_new(c, t, 3, &fo, &fp));
    OK(flatshard_flat_param_unshard(fp, NULL));
    for (k = 0; k < 3; k++) {
      float *d, *g;
      OK(flatshard_flat_param_view(fp, k, &v));
      d = (float *)v.data;
      g = (float *)v.grad;
      CHECK(v.numel == numels[k] && g != NULL, "view %d: numel %llu grad %p", (int)k,
            (unsigned long long)v.numel, v.grad);
      for (j = 0; j < v.numel; j++) {
        float want = k == 0 ? (float)j / 4.0f : k == 1 ? (float)(-(int)j) / 2.0f : (float)(j * j);
        CHECK(d[j] == want, "param %d[%d] = %g, want %g (rank 0's)", (int)k, (int)j, d[j], want);
        g[j] = (float)((int)j * (r + 1) + (int)k) / 4.0f;
      }
    }
    OK(flatshard_flat_param_reduce_grads(fp));
    OK(flatshard_flat_param_reshard(fp));
    OK(flatshard_flat_param_shard(fp, &shard));
    CHECK(shard.grad != NULL, "no shard grad");
    mix(shard.data, (size_t)shard.numel * 4);
    mix(shard.grad, (size_t)shard.numel * 4);
    flatshard_flat_param_free(fp);
  }

  /* averaging: average_parameters, then a periodic averager (period 2, warm-up 1) */
  {
    enum { P = 64 };
    float x[P], y[5];
    flatshard_tensor t[2];
    flatshard_averager *avg = NULL;
    int32_t group = -1;
    int step;
    for (i = 0; i < P; i++) x[i] = (float)(i + 4 * r) / 8.0f;
    for (i = 0; i < 5; i++) y[i] = (float)(r * r) * 2.0f;
    memset(t, 0, sizeof t);
    t[0].data = x; t[0].numel = P;
    t[1].data = y; t[1].numel = 5;
    t[0].dtype = t[1].dtype = FLATSHARD_F32;
    OK(flatshard_average_parameters(c, t, 2, 0));
    for (i = 0; i < P; i++) {
      float want = ((float)i + 2.0f * (float)(w - 1)) / 8.0f;
      CHECK(x[i] == want, "average x[%d] = %g, want %g", i, x[i], want);
    }
    mix(x, sizeof x);
    mix(y, sizeof y);
    OK(flatshard_periodic_averager_new(c, 2, 1, &avg));
    for (step = 0; step < 5; step++) {
      for (i = 0; i < P; i++) x[i] += (float)(r + step) / 4.0f;
      OK(flatshard_averager_step(avg, t, 2, 0, &group));
      mix(&group, sizeof group);
      mix(x, sizeof x);
    }
    flatshard_averager_free(avg);
  }

  flatshard_comm_free(c);
  printf("launch_job: rank %d of %d ok, mode %s, restart %d, hash %016llx\n", r, w, mode, restart,
         (unsigned long long)g_hash);
  fflush(stdout);
#ifdef LAUNCH_JOB_MPI
  MPI_Finalize();
#endif
  return 0;
}
