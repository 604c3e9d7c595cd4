/* A multi-rank tour of flatshard's collectives from C.
 *
 *   scripts/demo.sh                      (builds, then runs 4 ranks with flatshard-run)
 *   flatshard-run -n 4 -- ./collectives_demo [--quick]
 *   torchrun --no-python --nproc-per-node 4 ./collectives_demo
 *
 * Each rank fills its buffers with known values, runs every collective, checks
 * the result against what it must be, and rank 0 prints one table row per
 * (collective, size): time and bus bandwidth (as nccl-tests defines it). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "flatshard.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int check(flatshard_status s, const char *what) {
  if (s != FLATSHARD_OK) {
    fprintf(stderr, "%s FAILED: %s: %s\n", what, flatshard_status_name(s), flatshard_last_error());
    exit(1);
  }
  return 0;
}

int main(int argc, char **argv) {
  int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  flatshard_comm *c = NULL;
  check(flatshard_comm_init_from_env(NULL, &c), "flatshard_comm_init_from_env");
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
  size_t sizes[] = {1024, 256 * 1024, 4 * 1024 * 1024}; /* f32 elements */
  size_t n_sizes = quick ? 2 : 3;
  int bad = 0;
  if (r == 0) {
    printf("flatshard %s: %d ranks, f32 collectives (bus bandwidth as in nccl-tests)\n",
           flatshard_version(), w);
    printf("%-15s %10s %10s %10s  %s\n", "collective", "bytes", "time_ms", "busbw_GB/s", "check");
  }
  for (size_t k = 0; k < n_sizes; k++) {
    size_t n = sizes[k];
    float *buf = malloc(n * sizeof(float)), *all = malloc(n * w * sizeof(float));
    if (!buf || !all) return 1;
    const char *names[] = {"all_reduce", "all_gather", "reduce_scatter", "broadcast"};
    for (int op = 0; op < 4; op++) {
      double t0 = 0, secs = 0, factor = 1;
      int ok = 1;
      size_t nbytes = n * sizeof(float);
      for (int iter = 0; iter < 3; iter++) { /* iteration 0 warms up */
        for (size_t i = 0; i < n; i++) buf[i] = (float)(r + 1);
        for (size_t i = 0; i < n * w; i++) all[i] = (float)(r + 1);
        check(flatshard_barrier(c), "barrier");
        t0 = now_s();
        switch (op) {
          case 0: check(flatshard_all_reduce(c, buf, n, FLATSHARD_F32, FLATSHARD_SUM), names[op]); break;
          case 1: check(flatshard_all_gather(c, buf, all, n, FLATSHARD_F32), names[op]); break;
          case 2: check(flatshard_reduce_scatter(c, all, buf, n, FLATSHARD_F32, FLATSHARD_SUM), names[op]); break;
          default: check(flatshard_broadcast(c, buf, n, FLATSHARD_F32, w - 1), names[op]); break;
        }
        if (iter > 0) secs += (now_s() - t0) / 2;
      }
      /* expected: sum over ranks of (rank+1) = w(w+1)/2; gather: block q = q+1; bcast: w */
      float sum = (float)(w * (w + 1) / 2);
      for (size_t i = 0; i < n && ok; i++) {
        if (op == 0 || op == 2) ok = buf[i] == sum;
        if (op == 3) ok = buf[i] == (float)w;
      }
      if (op == 1)
        for (size_t i = 0; i < n * w && ok; i++) ok = all[i] == (float)(i / n + 1);
      if (op == 0) factor = 2.0 * (w - 1) / w;
      if (op == 1 || op == 2) { factor = (double)(w - 1) / w; nbytes *= (size_t)w; }
      /* the slowest rank's time is the collective's time */
      double t = secs;
      check(flatshard_all_reduce(c, &t, 1, FLATSHARD_F64, FLATSHARD_MAX), "all_reduce(max time)");
      int32_t oks = ok;
      check(flatshard_all_reduce(c, &oks, 1, FLATSHARD_I32, FLATSHARD_MIN), "all_reduce(min ok)");
      bad |= !oks;
      if (r == 0)
        printf("%-15s %10zu %10.3f %10.3f  %s\n", names[op], nbytes, t * 1e3,
               w > 1 ? nbytes / t / 1e9 * factor : 0.0, oks ? "ok" : "WRONG");
    }
    free(buf);
    free(all);
  }
  check(flatshard_barrier(c), "barrier");
  if (r == 0) {
    if (bad) printf("some results were WRONG\n");
    else printf("all results verified on %d ranks\n", w);
  }
  flatshard_comm_free(c);
  return bad;
}
