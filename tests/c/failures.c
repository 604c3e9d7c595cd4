/* Failure behaviour across processes. argv[1] selects the scenario:
 *   mismatch           ranks disagree on count/dtype/op/root/kind: MISMATCH on
 *                      every rank, and the communicator still works after.
 *   timeout <count>    the last rank never calls: the others return TIMEOUT or
 *                      PEER_LOST soon after timeout_ms, then ABORTED.
 *   death <count> <exit|abort>
 *                      the last rank dies (_exit(42) or abort()) from a second
 *                      thread while collectives run: the others get PEER_LOST
 *                      within a few seconds, then ABORTED.
 *   abort              rank 0 calls flatshard_comm_abort from a second thread
 *                      while its main thread waits in a collective that the
 *                      last rank joins late: ABORTED promptly on rank 0, an
 *                      error (PEER_LOST) rather than a hang on the others.
 *   token              just join and all-reduce (the harness adds intruders
 *                      with a wrong or missing FLATSHARD_TOKEN, which must get
 *                      AUTH while this job completes).
 *   intruder           join with whatever token the environment gives and
 *                      expect FLATSHARD_ERR_AUTH. */
#include "fs_test.h"

#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

static void expect_usable(flatshard_comm *c) {
  int w = flatshard_comm_size(c), r = flatshard_comm_rank(c);
  int32_t v[3] = {r, 1, 2 * r};
  CHECK_OK(flatshard_all_reduce(c, v, 3, FLATSHARD_I32, FLATSHARD_SUM));
  CHECK(v[0] == w * (w - 1) / 2 && v[1] == w && v[2] == w * (w - 1), "sum after mismatch: %d %d %d",
        v[0], v[1], v[2]);
}

static void mismatch(void) {
  flatshard_comm *c = join(30000);
  int r = flatshard_comm_rank(c), odd = (r == 1); /* rank 1 is the odd one out */
  size_t counts[] = {10, 300000};                 /* small path and ring path */
  float *buf = xmalloc(sizeof(float) * 4 * 300001);
  for (size_t k = 0; k < 2; k++) {
    size_t n = counts[k] + (size_t)odd;
    memset(buf, 0, sizeof(float) * 4 * 300001);
    EXPECT_STATUS(flatshard_all_reduce(c, buf, n, FLATSHARD_F32, FLATSHARD_SUM),
                  FLATSHARD_ERR_MISMATCH);
    CHECK(strlen(flatshard_last_error()) > 0, "no message for MISMATCH");
    expect_usable(c);
    EXPECT_STATUS(flatshard_all_gather(c, buf, buf + 300001, n, FLATSHARD_F32),
                  FLATSHARD_ERR_MISMATCH);
    expect_usable(c);
  }
  /* dtype */
  EXPECT_STATUS(flatshard_all_reduce(c, buf, 16, odd ? FLATSHARD_I32 : FLATSHARD_F32,
                                     FLATSHARD_SUM),
                FLATSHARD_ERR_MISMATCH);
  expect_usable(c);
  /* op */
  EXPECT_STATUS(flatshard_reduce_scatter(c, buf, buf + 1000, 8, FLATSHARD_F32,
                                         odd ? FLATSHARD_MAX : FLATSHARD_SUM),
                FLATSHARD_ERR_MISMATCH);
  expect_usable(c);
  /* root */
  EXPECT_STATUS(flatshard_broadcast(c, buf, 64, FLATSHARD_F32, odd ? 1 : 0),
                FLATSHARD_ERR_MISMATCH);
  expect_usable(c);
  /* different collectives */
  flatshard_status st = odd ? flatshard_broadcast(c, buf, 8, FLATSHARD_F32, 0)
                            : flatshard_all_reduce(c, buf, 8, FLATSHARD_F32, FLATSHARD_SUM);
  CHECK(st == FLATSHARD_ERR_MISMATCH, "different collectives gave %s (%s)",
        flatshard_status_name(st), flatshard_last_error());
  expect_usable(c);
  CHECK_OK(flatshard_barrier(c));
  free(buf);
  flatshard_comm_free(c);
  if (r == 0) printf("mismatch: every case reported on every rank; comm usable after\n");
}

static void timeout_case(size_t n) {
  const uint32_t timeout_ms = 2000;
  flatshard_comm *c = join(timeout_ms);
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
  if (r == w - 1) { /* never calls; outlives the others' deadline */
    sleep(3 * timeout_ms / 1000 + 2);
    flatshard_comm_free(c);
    return;
  }
  float *buf = xmalloc(n * sizeof(float));
  memset(buf, 0, n * sizeof(float));
  double t0 = now_s();
  flatshard_status st = flatshard_all_reduce(c, buf, n, FLATSHARD_F32, FLATSHARD_SUM);
  double dt = now_s() - t0;
  CHECK(st == FLATSHARD_ERR_TIMEOUT || st == FLATSHARD_ERR_PEER_LOST,
        "expected TIMEOUT or PEER_LOST, got %s (%s)", flatshard_status_name(st),
        flatshard_last_error());
  CHECK(dt < timeout_ms / 1000.0 + 4.0, "took %.2f s for a %u ms timeout", dt, timeout_ms);
  printf("rank %d: %s after %.2f s: %s\n", r, flatshard_status_name(st), dt,
         flatshard_last_error());
  EXPECT_STATUS(flatshard_all_reduce(c, buf, n, FLATSHARD_F32, FLATSHARD_SUM),
                FLATSHARD_ERR_ABORTED);
  free(buf);
  flatshard_comm_free(c);
}

static int g_use_abort;
static void *die_soon(void *arg) {
  (void)arg;
  struct timespec ts = {0, 300 * 1000 * 1000};
  nanosleep(&ts, NULL);
  if (g_use_abort) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    abort();
  }
  _exit(42);
}

static void death(size_t n, int use_abort) {
  flatshard_comm *c = join(60000); /* long: PEER_LOST must not wait for it */
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
  float *buf = xmalloc((n ? n : 1) * sizeof(float));
  memset(buf, 0, n * sizeof(float));
  if (r == w - 1) {
    g_use_abort = use_abort;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, die_soon, NULL) == 0, "pthread_create");
    for (;;) flatshard_all_reduce(c, buf, n, FLATSHARD_F32, FLATSHARD_SUM);
  }
  flatshard_status st = FLATSHARD_OK;
  int iters = 0;
  double t_fail = 0, t_last = now_s();
  while (st == FLATSHARD_OK) {
    t_last = now_s();
    st = flatshard_all_reduce(c, buf, n, FLATSHARD_F32, FLATSHARD_SUM);
    iters++;
    t_fail = now_s() - t_last;
    CHECK(iters < 1000000, "the dead rank was never noticed");
  }
  CHECK(st == FLATSHARD_ERR_PEER_LOST, "expected PEER_LOST, got %s (%s)",
        flatshard_status_name(st), flatshard_last_error());
  CHECK(t_fail < 5.0, "the failing call took %.2f s", t_fail);
  printf("rank %d: %s after %d calls (failing call %.3f s): %s\n", r, flatshard_status_name(st),
         iters, t_fail, flatshard_last_error());
  EXPECT_STATUS(flatshard_barrier(c), FLATSHARD_ERR_ABORTED);
  free(buf);
  flatshard_comm_free(c);
}

static flatshard_comm *g_abort_comm;
static void *abort_soon(void *arg) {
  (void)arg;
  struct timespec ts = {0, 300 * 1000 * 1000};
  nanosleep(&ts, NULL);
  CHECK_OK(flatshard_comm_abort(g_abort_comm));
  return NULL;
}

static void abort_case(void) {
  flatshard_comm *c = join(60000);
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
  float buf[64] = {0};
  CHECK_OK(flatshard_barrier(c));
  if (r == w - 1) sleep(2); /* late: rank 0 is stuck waiting for us */
  pthread_t t;
  if (r == 0) {
    g_abort_comm = c;
    CHECK(pthread_create(&t, NULL, abort_soon, NULL) == 0, "pthread_create");
  }
  double t0 = now_s();
  flatshard_status st = flatshard_all_reduce(c, buf, 64, FLATSHARD_F32, FLATSHARD_SUM);
  double dt = now_s() - t0;
  if (r == 0) {
    pthread_join(t, NULL);
    CHECK(st == FLATSHARD_ERR_ABORTED,
          "aborted call returned %s (%s)", flatshard_status_name(st), flatshard_last_error());
    CHECK(dt < 1.5, "abort took %.2f s to unblock the collective", dt);
  } else {
    /* Shared memory can finish the call with rank 0's already-published data
       (a correct result); the next call must then fail. */
    if (st == FLATSHARD_OK) {
      t0 = now_s();
      st = flatshard_all_reduce(c, buf, 64, FLATSHARD_F32, FLATSHARD_SUM);
      dt = now_s() - t0;
    }
    CHECK(st == FLATSHARD_ERR_PEER_LOST || st == FLATSHARD_ERR_ABORTED,
          "a peer of an aborted rank got %s (%s)", flatshard_status_name(st), flatshard_last_error());
    CHECK(dt < 5.0, "a peer of an aborted rank waited %.2f s", dt);
  }
  printf("rank %d: %s after %.2f s\n", r, flatshard_status_name(st), dt);
  EXPECT_STATUS(flatshard_barrier(c), FLATSHARD_ERR_ABORTED);
  flatshard_comm_free(c);
}

static void token(void) {
  flatshard_comm *c = join(30000);
  expect_usable(c);
  CHECK_OK(flatshard_barrier(c));
  flatshard_comm_free(c);
  if (g_rank == 0) printf("token: job completed\n");
}

static void intruder(void) {
  flatshard_comm_options o;
  flatshard_comm_options_init(&o);
  o.timeout_ms = 20000;
  g_rank = env_int("RANK", -1);
  flatshard_comm *c = NULL;
  EXPECT_STATUS(flatshard_comm_init_from_env(&o, &c), FLATSHARD_ERR_AUTH);
  CHECK(c == NULL, "out written on failure");
  printf("intruder refused: %s\n", flatshard_last_error());
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "";
  size_t n = argc > 2 ? (size_t)strtoull(argv[2], NULL, 10) : 16;
  if (strcmp(mode, "mismatch") == 0) mismatch();
  else if (strcmp(mode, "timeout") == 0) timeout_case(n);
  else if (strcmp(mode, "death") == 0) death(n, argc > 3 && strcmp(argv[3], "abort") == 0);
  else if (strcmp(mode, "abort") == 0) abort_case();
  else if (strcmp(mode, "token") == 0) token();
  else if (strcmp(mode, "intruder") == 0) intruder();
  else FAIL("unknown mode '%s'", mode);
  return 0;
}
