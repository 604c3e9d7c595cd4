/* Sub-communicators: new_subgroups (contiguous blocks) and split (MPI
 * semantics: order by key then parent rank; color < 0 gets NULL), with
 * collectives running concurrently in disjoint groups, and a nested split. */
#include "fs_test.h"

/* all_reduce SUM of value(parent rank) over the members, checked against the
   sum over `members` (parent ranks) computed here. */
static void check_group_sum(flatshard_comm *g, int parent_rank, const int *members, int m,
                            flatshard_dtype dt, size_t n) {
  void *buf = xmalloc(n * dt_size(dt));
  for (size_t i = 0; i < n; i++) put(buf, dt, i, value(parent_rank, i, 7, dt));
  CHECK_OK(flatshard_all_reduce(g, buf, n, dt, FLATSHARD_SUM));
  for (size_t i = 0; i < n; i++) {
    double want = 0;
    for (int k = 0; k < m; k++) want += value(members[k], i, 7, dt);
    CHECK(get(buf, dt, i) == want, "group sum %s n=%zu elem %zu: got %g want %g", dt_name(dt), n,
          i, get(buf, dt, i), want);
  }
  free(buf);
}

int main(void) {
  flatshard_comm *c = join(60000);
  int r = flatshard_comm_rank(c), w = flatshard_comm_size(c);
  int members[64];

  /* new_subgroups: every divisor of w */
  for (int gs = 1; gs <= w; gs++) {
    if (w % gs) continue;
    flatshard_comm *g = NULL;
    CHECK_OK(flatshard_comm_new_subgroups(c, gs, &g));
    CHECK(flatshard_comm_size(g) == gs && flatshard_comm_rank(g) == r % gs,
          "subgroup of %d: rank %d size %d", gs, flatshard_comm_rank(g), flatshard_comm_size(g));
    for (int k = 0; k < gs; k++) members[k] = r / gs * gs + k;
    check_group_sum(g, r, members, gs, FLATSHARD_F32, 5);
    check_group_sum(g, r, members, gs, FLATSHARD_I64, 20000); /* ring path */
    flatshard_comm_free(g);
  }
  flatshard_comm *bad = NULL;
  EXPECT_STATUS(flatshard_comm_new_subgroups(c, w + 1, &bad), FLATSHARD_ERR_INVALID_ARGUMENT);
  CHECK(strstr(flatshard_last_error(), "group_size") != NULL, "message: %s", flatshard_last_error());

  /* split: color = parity, key = -rank (reverse order); rank 0 opts out */
  flatshard_comm *s = NULL;
  int color = r == 0 ? -1 : r % 2;
  CHECK_OK(flatshard_comm_split(c, color, -r, &s));
  if (r == 0) {
    CHECK(s == NULL, "color < 0 must give NULL");
  } else {
    int m = 0;
    for (int q = w - 1; q >= 1; q--)
      if (q % 2 == color) members[m++] = q;
    int my = -1;
    for (int k = 0; k < m; k++)
      if (members[k] == r) my = k;
    CHECK(flatshard_comm_size(s) == m && flatshard_comm_rank(s) == my,
          "split: rank %d size %d, expected %d of %d", flatshard_comm_rank(s),
          flatshard_comm_size(s), my, m);
    check_group_sum(s, r, members, m, FLATSHARD_BF16, 100);
    /* broadcast from the split's rank 0 (the highest parent rank of the color) */
    int32_t v = r;
    CHECK_OK(flatshard_broadcast(s, &v, 1, FLATSHARD_I32, 0));
    CHECK(v == members[0], "split broadcast: %d, expected %d", v, members[0]);
    /* nested: split the split in halves by new rank */
    flatshard_comm *n2 = NULL;
    int half = flatshard_comm_rank(s) < (m + 1) / 2;
    CHECK_OK(flatshard_comm_split(s, half, 0, &n2));
    int nm = 0, nmembers[64];
    for (int k = 0; k < m; k++)
      if ((k < (m + 1) / 2) == half) nmembers[nm++] = members[k];
    CHECK(flatshard_comm_size(n2) == nm, "nested split size %d, expected %d",
          flatshard_comm_size(n2), nm);
    check_group_sum(n2, r, nmembers, nm, FLATSHARD_F64, 33);
    flatshard_comm_free(n2);
    flatshard_comm_free(s);
  }
  /* the parent still works after its children are gone */
  int64_t one = 1;
  CHECK_OK(flatshard_all_reduce(c, &one, 1, FLATSHARD_I64, FLATSHARD_SUM));
  CHECK(one == w, "parent sum %lld", (long long)one);
  CHECK_OK(flatshard_barrier(c));
  flatshard_comm_free(c);
  if (r == 0) printf("groups: world %d OK\n", w);
  return 0;
}
