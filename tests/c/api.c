/* Single-process checks of the C conventions: status names, version, last
 * error, NULL handles and pointers, out-of-range enums, options struct_size,
 * environment errors. Each bad argument must be named in flatshard_last_error(). */
#include "fs_test.h"

#define EXPECT_INVALID(call, argname)                                             \
  do {                                                                            \
    EXPECT_STATUS(call, FLATSHARD_ERR_INVALID_ARGUMENT);                          \
    CHECK(strstr(flatshard_last_error(), argname) != NULL,                        \
          "%s: message does not name '%s': %s", #call, argname, flatshard_last_error()); \
  } while (0)

int main(void) {
  g_rank = 0;
  CHECK(strcmp(flatshard_last_error(), "") == 0, "last error before any failure: '%s'",
        flatshard_last_error());

  /* status names and version */
  static const char *names[] = {"FLATSHARD_OK", "FLATSHARD_ERR_INVALID_ARGUMENT",
      "FLATSHARD_ERR_INVALID_STATE", "FLATSHARD_ERR_UNSUPPORTED", "FLATSHARD_ERR_MISMATCH",
      "FLATSHARD_ERR_TIMEOUT", "FLATSHARD_ERR_PEER_LOST", "FLATSHARD_ERR_AUTH",
      "FLATSHARD_ERR_ABORTED", "FLATSHARD_ERR_OUT_OF_MEMORY", "FLATSHARD_ERR_IO",
      "FLATSHARD_ERR_CUDA", "FLATSHARD_ERR_NCCL", "FLATSHARD_ERR_INTERNAL"};
  for (int s = 0; s <= FLATSHARD_ERR_INTERNAL; s++)
    CHECK(strcmp(flatshard_status_name((flatshard_status)s), names[s]) == 0, "name of %d: %s", s,
          flatshard_status_name((flatshard_status)s));
  CHECK(flatshard_status_name((flatshard_status)1000) != NULL, "unknown status name is NULL");
  char ver[64];
  snprintf(ver, sizeof ver, "%d.%d.%d", FLATSHARD_VERSION_MAJOR, FLATSHARD_VERSION_MINOR,
           FLATSHARD_VERSION_PATCH);
  CHECK(strcmp(flatshard_version(), ver) == 0, "version %s vs header %s", flatshard_version(), ver);

  /* NULL handles */
  float x[4] = {1, 2, 3, 4};
  CHECK(flatshard_comm_rank(NULL) == -1 && flatshard_comm_size(NULL) == -1, "rank/size of NULL");
  flatshard_comm_free(NULL);
  EXPECT_INVALID(flatshard_all_reduce(NULL, x, 4, FLATSHARD_F32, FLATSHARD_SUM), "c");
  EXPECT_INVALID(flatshard_barrier(NULL), "c");
  EXPECT_INVALID(flatshard_comm_abort(NULL), "c");
  EXPECT_INVALID(flatshard_comm_init(NULL, 1, 0, 1, NULL, NULL), "out");

  /* a world of one */
  flatshard_comm *c = NULL;
  CHECK_OK(flatshard_comm_init(NULL, 0, 0, 1, NULL, &c));
  CHECK(flatshard_comm_rank(c) == 0 && flatshard_comm_size(c) == 1, "world of one");
  CHECK_OK(flatshard_all_reduce(c, x, 4, FLATSHARD_F32, FLATSHARD_AVG));
  CHECK(x[3] == 4.0f, "avg over one rank changed the value");

  /* NULL buffers with a count, bad enums, bad root, AVG on integers */
  EXPECT_INVALID(flatshard_all_reduce(c, NULL, 4, FLATSHARD_F32, FLATSHARD_SUM), "buf");
  EXPECT_INVALID(flatshard_all_gather(c, NULL, x, 1, FLATSHARD_F32), "send");
  EXPECT_INVALID(flatshard_all_gather(c, x, NULL, 1, FLATSHARD_F32), "recv");
  EXPECT_INVALID(flatshard_reduce_scatter(c, x, NULL, 1, FLATSHARD_F32, FLATSHARD_SUM), "recv");
  EXPECT_INVALID(flatshard_broadcast(c, NULL, 2, FLATSHARD_F32, 0), "buf");
  EXPECT_INVALID(flatshard_all_reduce(c, x, 4, (flatshard_dtype)7, FLATSHARD_SUM), "dt");
  EXPECT_INVALID(flatshard_all_reduce(c, x, 4, (flatshard_dtype)-1, FLATSHARD_SUM), "dt");
  EXPECT_INVALID(flatshard_all_reduce(c, x, 4, FLATSHARD_F32, (flatshard_reduce_op)4), "op");
  EXPECT_INVALID(flatshard_reduce_scatter(c, x, x + 2, 1, FLATSHARD_F32, (flatshard_reduce_op)99),
                 "op");
  EXPECT_INVALID(flatshard_broadcast(c, x, 4, FLATSHARD_F32, 1), "root");
  EXPECT_INVALID(flatshard_broadcast(c, x, 4, FLATSHARD_F32, -1), "root");
  int32_t ints[2] = {1, 2};
  EXPECT_INVALID(flatshard_all_reduce(c, ints, 2, FLATSHARD_I32, FLATSHARD_AVG), "op");
  EXPECT_INVALID(flatshard_comm_split(c, 0, 0, NULL), "out");
  EXPECT_INVALID(flatshard_comm_new_subgroups(c, 0, NULL), "out");
  flatshard_comm *sub = NULL;
  EXPECT_INVALID(flatshard_comm_new_subgroups(c, 0, &sub), "group_size");
  CHECK(sub == NULL, "out written on failure");
  /* count 0 with NULL buffers is legal */
  CHECK_OK(flatshard_all_reduce(c, NULL, 0, FLATSHARD_F32, FLATSHARD_SUM));
  CHECK_OK(flatshard_all_gather(c, NULL, NULL, 0, FLATSHARD_U8));
  CHECK_OK(flatshard_broadcast(c, NULL, 0, FLATSHARD_I64, 0));
  CHECK_OK(flatshard_comm_abort(c));
  EXPECT_STATUS(flatshard_barrier(c), FLATSHARD_ERR_ABORTED);
  flatshard_comm_free(c);

  /* options */
  flatshard_comm_options o;
  flatshard_comm_options_init(&o);
  CHECK(o.struct_size == sizeof o && o.timeout_ms == 0 && o.token == NULL, "options_init");
  flatshard_comm_options_init(NULL);
  o.struct_size = 3;
  EXPECT_INVALID(flatshard_comm_init(NULL, 0, 0, 1, &o, &c), "struct_size");
  flatshard_comm_options_init(&o);
  o.transport = (flatshard_transport)9;
  EXPECT_INVALID(flatshard_comm_init(NULL, 0, 0, 1, &o, &c), "transport");
  EXPECT_INVALID(flatshard_comm_init("127.0.0.1", 1, 2, 2, NULL, &c), "rank");
  EXPECT_INVALID(flatshard_comm_init("127.0.0.1", 1, 0, 0, NULL, &c), "world_size");
  EXPECT_INVALID(flatshard_comm_init(NULL, 1, 0, 2, NULL, &c), "master_addr");
  EXPECT_INVALID(flatshard_comm_init("127.0.0.1", 0, 0, 2, NULL, &c), "master_port");

  /* environment */
  unsetenv("WORLD_SIZE");
  EXPECT_INVALID(flatshard_comm_init_from_env(NULL, &c), "WORLD_SIZE");
  setenv("WORLD_SIZE", "2", 1);
  setenv("RANK", "zero", 1);
  EXPECT_INVALID(flatshard_comm_init_from_env(NULL, &c), "RANK");
  setenv("RANK", "0", 1);
  unsetenv("MASTER_PORT");
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  EXPECT_INVALID(flatshard_comm_init_from_env(NULL, &c), "MASTER_PORT");
  setenv("WORLD_SIZE", "1", 1);
  unsetenv("MASTER_ADDR");
  CHECK_OK(flatshard_comm_init_from_env(NULL, &c));
  CHECK(flatshard_comm_size(c) == 1, "world of one from env");
  flatshard_comm_free(c);

  printf("api: conventions OK (library %s)\n", flatshard_version());
  return 0;
}
