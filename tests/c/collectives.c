/* Every collective x every dtype x several counts against a sequential
 * reference computed here. argv[1]: "small" (counts up to ~1K, for large
 * worlds) or "full" (adds counts past the 32 KiB ring threshold, and ~1M f32). */
#include "fs_test.h"

static const flatshard_reduce_op OPS[] = {FLATSHARD_SUM, FLATSHARD_AVG, FLATSHARD_MIN,
                                          FLATSHARD_MAX};

static double reduce_ref(flatshard_reduce_op op, flatshard_dtype dt, int w, size_t i,
                         int salt) {
  double acc = value(0, i, salt, dt);
  for (int q = 1; q < w; q++) {
    double v = value(q, i, salt, dt);
    if (op == FLATSHARD_SUM || op == FLATSHARD_AVG) acc += v;
    if (op == FLATSHARD_MIN && v < acc) acc = v;
    if (op == FLATSHARD_MAX && v > acc) acc = v;
  }
  if (op == FLATSHARD_AVG) /* f32 accumulate (f16/bf16/f32), f64 for f64 */
    return dt == FLATSHARD_F64 ? acc / w : round_to(dt, (double)((float)acc / (float)w));
  return round_to(dt, acc);
}

static void check_buf(const char *what, const void *buf, flatshard_dtype dt, size_t n,
                      flatshard_reduce_op op, int w, size_t offset, int salt) {
  for (size_t i = 0; i < n; i++) {
    double want = reduce_ref(op, dt, w, offset + i, salt);
    double got = get(buf, dt, i);
    if (got != want)
      FAIL("%s %s n=%zu: element %zu is %g, expected %g", what, dt_name(dt), n, i, got, want);
  }
}

static void run_one(flatshard_comm *c, flatshard_dtype dt, size_t n, int salt) {
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
  size_t es = dt_size(dt);
  void *buf = xmalloc(n * w * es), *big = xmalloc(n * w * es), *small = xmalloc(n * es);

  for (size_t k = 0; k < sizeof OPS / sizeof OPS[0]; k++) {
    flatshard_reduce_op op = OPS[k];
    /* all_reduce (in place) */
    for (size_t i = 0; i < n; i++) put(buf, dt, i, value(r, i, salt, dt));
    void *p = n ? buf : NULL; /* count 0: NULL is legal */
    if (op == FLATSHARD_AVG && !dt_is_float(dt)) {
      EXPECT_STATUS(flatshard_all_reduce(c, p, n, dt, op), FLATSHARD_ERR_INVALID_ARGUMENT);
      continue;
    }
    CHECK_OK(flatshard_all_reduce(c, p, n, dt, op));
    check_buf("all_reduce", buf, dt, n, op, w, 0, salt);

    /* reduce_scatter: input is w*n elements, this rank keeps block r */
    for (size_t i = 0; i < n * w; i++) put(big, dt, i, value(r, i, salt + 1, dt));
    memset(small, 0xAB, n * es);
    CHECK_OK(flatshard_reduce_scatter(c, n ? big : NULL, n ? small : NULL, n, dt, op));
    check_buf("reduce_scatter", small, dt, n, op, w, (size_t)r * n, salt + 1);
  }

  /* all_gather: block q of the result is rank q's input */
  for (size_t i = 0; i < n; i++) put(small, dt, i, value(r, i, salt + 2, dt));
  memset(big, 0xCD, n * w * es);
  CHECK_OK(flatshard_all_gather(c, n ? small : NULL, n ? big : NULL, n, dt));
  for (int q = 0; q < w; q++)
    for (size_t i = 0; i < n; i++) {
      double want = value(q, i, salt + 2, dt), got = get(big, dt, (size_t)q * n + i);
      if (got != want)
        FAIL("all_gather %s n=%zu: block %d element %zu is %g, expected %g", dt_name(dt), n, q,
             i, got, want);
    }

  /* in-place all_gather: send is this rank's block inside recv */
  for (size_t i = 0; i < n; i++) put((char *)big + (size_t)r * n * es, dt, i, value(r, i, 9, dt));
  CHECK_OK(flatshard_all_gather(c, n ? (char *)big + (size_t)r * n * es : NULL, n ? big : NULL,
                                n, dt));
  for (int q = 0; q < w; q++)
    for (size_t i = 0; i < n; i++)
      CHECK(get(big, dt, (size_t)q * n + i) == value(q, i, 9, dt), "in-place all_gather %s n=%zu",
            dt_name(dt), n);

  /* broadcast from every root */
  for (int root = 0; root < w; root++) {
    for (size_t i = 0; i < n; i++) put(buf, dt, i, value(r, i, salt + 3, dt));
    CHECK_OK(flatshard_broadcast(c, n ? buf : NULL, n, dt, root));
    for (size_t i = 0; i < n; i++)
      if (get(buf, dt, i) != value(root, i, salt + 3, dt))
        FAIL("broadcast %s n=%zu root %d: element %zu is %g, expected %g", dt_name(dt), n, root,
             i, get(buf, dt, i), value(root, i, salt + 3, dt));
  }
  free(buf);
  free(big);
  free(small);
}

int main(int argc, char **argv) {
  int full = argc > 1 && strcmp(argv[1], "full") == 0;
  flatshard_comm *c = join(60000);
  int w = flatshard_comm_size(c);
  static const size_t small_counts[] = {0, 1, 5, 1027};
  double t0 = now_s();
  for (size_t d = 0; d < N_DTYPES; d++) {
    for (size_t k = 0; k < sizeof small_counts / sizeof small_counts[0]; k++)
      run_one(c, ALL_DTYPES[d], small_counts[k], (int)k);
    if (full) /* > 32 KiB per message for every dtype: the ring path */
      run_one(c, ALL_DTYPES[d], 70001, 3);
  }
  if (full) {
    run_one(c, FLATSHARD_F32, 1048579, 1);
    run_one(c, FLATSHARD_BF16, 1048579, 2);
  }
  CHECK_OK(flatshard_barrier(c));
  if (g_rank == 0)
    printf("collectives: world %d, %s counts, all dtypes and ops OK in %.2f s\n", w,
           full ? "full" : "small", now_s() - t0);
  flatshard_comm_free(c);
  return 0;
}
