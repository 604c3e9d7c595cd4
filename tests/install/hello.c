/* Built against an installed flatshard (pkg-config). One rank, no network. */
#include <flatshard.h>
#include <stdio.h>
#include <string.h>

int main(void) {
  flatshard_comm *c = NULL;
  flatshard_status s = flatshard_comm_init(NULL, 0, 0, 1, NULL, &c);
  if (s != FLATSHARD_OK) {
    fprintf(stderr, "init: %s %s\n", flatshard_status_name(s), flatshard_last_error());
    return 1;
  }
  float x[3] = {1, 2, 3};
  s = flatshard_all_reduce(c, x, 3, FLATSHARD_F32, FLATSHARD_SUM);
  printf("flatshard %s rank %d/%d sum-ok=%d\n", flatshard_version(), flatshard_comm_rank(c),
         flatshard_comm_size(c), s == FLATSHARD_OK && x[2] == 3.0f);
  flatshard_comm_free(c);
  return s == FLATSHARD_OK && strlen(flatshard_version()) > 0 ? 0 : 1;
}
