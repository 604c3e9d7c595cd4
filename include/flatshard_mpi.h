/* flatshard_mpi.h: start flatshard under MPI (Open MPI, MPICH, or any MPI).
 *
 * Header-only and compiled by YOUR mpicc, so libflatshard links no MPI and
 * works with every MPI ABI. Include it before other headers, or compile in a
 * mode with POSIX declarations (mpicc's default gnu mode, or
 * -D_POSIX_C_SOURCE=200809L), as it uses sockets to pick a free port.
 *
 *   flatshard_comm_init_mpi(MPI_COMM_WORLD, NULL, &c)
 *       MPI starts the job, flatshard moves the data: rank and size come from
 *       mpi_comm; rank 0 picks the rendezvous address and a free port and a
 *       fresh random job token, MPI_Bcast hands them to every rank, and the
 *       communicator is a normal flatshard one (shared memory within a host,
 *       TCP across hosts, token-authenticated connections).
 *   flatshard_comm_from_mpi(MPI_COMM_WORLD, &c)
 *       MPI moves the data: a user-callback communicator
 *       (flatshard_comm_from_collectives) whose collectives are MPI's, on a
 *       duplicate of mpi_comm (MPI_Comm_dup; freed by flatshard_comm_free,
 *       which must then come before MPI_Finalize).
 *
 * Both are collective over mpi_comm (call them on every rank, after MPI_Init).
 * Each function's comment below ends, as in flatshard.h, with who owns what
 * (Ownership:), the thread rules (Threads:) and its statuses (Statuses:).
 */
#ifndef FLATSHARD_MPI_H
#define FLATSHARD_MPI_H

#if !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
#define _POSIX_C_SOURCE 200809L /* effective only when included first */
#endif

#include <mpi.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "flatshard.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- flatshard_comm_init_mpi ------------------------------------------- */

/* What rank 0 broadcasts. */
typedef struct {
  int32_t status;       /* FLATSHARD_OK, or why rank 0 could not prepare */
  uint16_t port;
  char addr[256];       /* rendezvous host (NUL-terminated) */
  char token[65];       /* fresh job token, hex (NUL-terminated) */
} flatshard_mpi_rdzv_;

/* A loopback-free IPv4 address of this host (by its hostname), or "" . */
static inline void flatshard_mpi_host_addr_(char *out, size_t len) {
  char host[256];
  struct addrinfo hints, *res = NULL, *p;
  out[0] = '\0';
  if (gethostname(host, sizeof host - 1) != 0) return;
  host[sizeof host - 1] = '\0';
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host, NULL, &hints, &res) != 0) return;
  for (p = res; p != NULL; p = p->ai_next) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)p->ai_addr;
    if ((ntohl(a->sin_addr.s_addr) >> 24) == 127) continue;
    if (inet_ntop(AF_INET, &a->sin_addr, out, (socklen_t)len) != NULL) break;
    out[0] = '\0';
  }
  freeaddrinfo(res);
}

/* A free port on `addr` (0 if none), held by *fd: a socket bound there with
 * SO_REUSEADDR but not listening, so no other process can take the port while
 * the rendezvous address travels, yet flatshard (SO_REUSEADDR too) can listen
 * on it. Rank 0 closes *fd once flatshard_comm_init has returned. */
static inline uint16_t flatshard_mpi_free_port_(const char *addr, int *fd) {
  struct sockaddr_in a;
  socklen_t alen = sizeof a;
  int one = 1;
  *fd = socket(AF_INET, SOCK_STREAM, 0);
  if (*fd < 0) return 0;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) a.sin_addr.s_addr = htonl(INADDR_ANY);
  if (setsockopt(*fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0 &&
      bind(*fd, (struct sockaddr *)&a, sizeof a) == 0 &&
      getsockname(*fd, (struct sockaddr *)&a, &alen) == 0)
    return ntohs(a.sin_port);
  close(*fd);
  *fd = -1;
  return 0;
}

/* 32 random bytes from the kernel, as 64 hex digits. */
static inline int flatshard_mpi_token_(char out[65]) {
  unsigned char b[32];
  size_t i;
  FILE *f = fopen("/dev/urandom", "rb");
  if (f == NULL) return -1;
  if (fread(b, 1, sizeof b, f) != sizeof b) {
    fclose(f);
    return -1;
  }
  fclose(f);
  for (i = 0; i < sizeof b; i++) snprintf(out + 2 * i, 3, "%02x", b[i]);
  out[64] = '\0';
  return 0;
}

/* MPI starts the job, flatshard moves the data. Rank and size come from
 * mpi_comm. Rank 0 picks the rendezvous host (its opts->bind_addr when given;
 * 127.0.0.1 when every rank runs on rank 0's host, by MPI_Get_processor_name;
 * else the address rank 0's hostname resolves to), a free port, and a fresh
 * random job token (used unless opts->token is set); MPI_Bcast hands them to
 * every rank, which then calls flatshard_comm_init.
 *
 * Ownership: mpi_comm stays the caller's and is used during the call only;
 * *opts is read during the call only. On success *out owns a normal host
 * communicator, independent of MPI from then on: free it with
 * flatshard_comm_free.
 *
 * Threads: collective over mpi_comm: every rank calls it, after MPI_Init; the
 * MPI calls run on the calling thread. The communicator then follows the
 * rules of flatshard.h like any other.
 *
 * Statuses: those of flatshard_comm_init (with flatshard_last_error() set);
 * and, before flatshard is reached and without a message: INVALID_ARGUMENT
 * (MPI_Comm_rank/size refused mpi_comm), OUT_OF_MEMORY, IO (an MPI call
 * failed; on rank 0, no address, no free port or no randomness: every rank
 * then returns the same status). MPI's own errors follow mpi_comm's error
 * handler (fatal by default). */
static inline flatshard_status flatshard_comm_init_mpi(MPI_Comm mpi_comm,
                                                       const flatshard_comm_options *opts,
                                                       flatshard_comm **out) {
  int rank = 0, size = 0, namelen = 0, i, one_host = 1, hold = -1;
  flatshard_status st;
  char name[MPI_MAX_PROCESSOR_NAME + 1];
  char *names;
  flatshard_mpi_rdzv_ r;
  flatshard_comm_options o;
  size_t first_layout = offsetof(flatshard_comm_options, transport) + sizeof(flatshard_transport);

  if (out == NULL) return flatshard_comm_init("", 0, 0, 1, opts, out); /* reports `out` */
  if (MPI_Comm_rank(mpi_comm, &rank) != MPI_SUCCESS || MPI_Comm_size(mpi_comm, &size) != MPI_SUCCESS)
    return FLATSHARD_ERR_INVALID_ARGUMENT;

  memset(name, 0, sizeof name);
  if (MPI_Get_processor_name(name, &namelen) != MPI_SUCCESS) return FLATSHARD_ERR_IO;
  names = (char *)calloc((size_t)size, sizeof name);
  if (names == NULL) return FLATSHARD_ERR_OUT_OF_MEMORY;
  if (MPI_Allgather(name, (int)sizeof name, MPI_CHAR, names, (int)sizeof name, MPI_CHAR, mpi_comm) !=
      MPI_SUCCESS) {
    free(names);
    return FLATSHARD_ERR_IO;
  }
  for (i = 1; i < size; i++)
    if (strncmp(names, names + (size_t)i * sizeof name, sizeof name) != 0) one_host = 0;
  free(names);

  memset(&r, 0, sizeof r);
  if (rank == 0) {
    r.status = FLATSHARD_OK;
    if (opts != NULL && (opts->struct_size == 0 || opts->struct_size >= first_layout) &&
        opts->bind_addr != NULL && opts->bind_addr[0] != '\0')
      snprintf(r.addr, sizeof r.addr, "%s", opts->bind_addr);
    else if (one_host)
      snprintf(r.addr, sizeof r.addr, "127.0.0.1");
    else
      flatshard_mpi_host_addr_(r.addr, sizeof r.addr);
    if (r.addr[0] == '\0') r.status = FLATSHARD_ERR_IO;
    if (r.status == FLATSHARD_OK && (r.port = flatshard_mpi_free_port_(r.addr, &hold)) == 0)
      r.status = FLATSHARD_ERR_IO;
    if (r.status == FLATSHARD_OK && flatshard_mpi_token_(r.token) != 0) r.status = FLATSHARD_ERR_IO;
  }
  if (MPI_Bcast(&r, (int)sizeof r, MPI_BYTE, 0, mpi_comm) != MPI_SUCCESS) {
    if (hold >= 0) close(hold);
    return FLATSHARD_ERR_IO;
  }
  if (r.status != FLATSHARD_OK) {
    if (hold >= 0) close(hold);
    return (flatshard_status)r.status;
  }
  r.addr[sizeof r.addr - 1] = '\0';
  r.token[sizeof r.token - 1] = '\0';

  /* The caller's options, with the fresh token unless they chose one. */
  flatshard_comm_options_init(&o);
  if (opts != NULL) {
    size_t n = opts->struct_size == 0 ? first_layout : (size_t)opts->struct_size;
    if (n > sizeof o || n < first_layout) { /* a layout this header does not know */
      st = flatshard_comm_init(r.addr, r.port, rank, size, opts, out); /* reports it */
      if (hold >= 0) close(hold);
      return st;
    }
    memcpy(&o, opts, n);
  }
  if (o.token == NULL) o.token = r.token;
  st = flatshard_comm_init(r.addr, r.port, rank, size, &o, out);
  if (hold >= 0) close(hold);
  return st;
}

/* ---- flatshard_comm_from_mpi ------------------------------------------- */

typedef struct {
  MPI_Comm comm;
} flatshard_mpi_ctx_;

/* IEEE half / bfloat16 <-> float, round to nearest even (what flatshard's own
 * reductions do: accumulate in f32, round once). */
static inline float flatshard_mpi_f16_to_f32_(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  float f;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalise */
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        exp--;
      }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t flatshard_mpi_f32_to_f16_(float f) {
  uint32_t x, sign, man;
  int32_t exp;
  memcpy(&x, &f, 4);
  sign = (x >> 16) & 0x8000u;
  exp = (int32_t)((x >> 23) & 0xffu);
  man = x & 0x7fffffu;
  if (exp == 255) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0u)); /* inf / nan */
  exp = exp - 127 + 15;
  if (exp >= 31) return (uint16_t)(sign | 0x7c00u); /* overflow: inf */
  if (exp <= 0) {                                   /* subnormal or zero */
    uint32_t shift, m, half, rest, r;
    if (exp < -10) return (uint16_t)sign;
    m = man | 0x800000u;
    shift = (uint32_t)(14 - exp);
    r = m >> shift;
    rest = m & ((1u << shift) - 1);
    half = 1u << (shift - 1);
    if (rest > half || (rest == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  {
    uint32_t r = ((uint32_t)exp << 10) | (man >> 13), rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) r++; /* may carry into inf: right */
    return (uint16_t)(sign | r);
  }
}

static inline float flatshard_mpi_bf16_to_f32_(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t flatshard_mpi_f32_to_bf16_(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet nan */
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static inline int flatshard_mpi_is_half_(flatshard_dtype dt) {
  return dt == FLATSHARD_F16 || dt == FLATSHARD_BF16;
}

static inline size_t flatshard_mpi_elsize_(flatshard_dtype dt) {
  switch (dt) {
    case FLATSHARD_F64: case FLATSHARD_I64: return 8;
    case FLATSHARD_F32: case FLATSHARD_I32: return 4;
    case FLATSHARD_F16: case FLATSHARD_BF16: return 2;
    default: return 1;
  }
}

/* The MPI type that reduces like `dt` (halves reduce as float). */
static inline MPI_Datatype flatshard_mpi_type_(flatshard_dtype dt) {
  switch (dt) {
    case FLATSHARD_F32: case FLATSHARD_F16: case FLATSHARD_BF16: return MPI_FLOAT;
    case FLATSHARD_F64: return MPI_DOUBLE;
    case FLATSHARD_I32: return MPI_INT32_T;
    case FLATSHARD_I64: return MPI_INT64_T;
    default: return MPI_UINT8_T;
  }
}

static inline int flatshard_mpi_op_(flatshard_reduce_op op, MPI_Op *out) {
  switch (op) {
    case FLATSHARD_SUM: *out = MPI_SUM; return 0;
    case FLATSHARD_MIN: *out = MPI_MIN; return 0;
    case FLATSHARD_MAX: *out = MPI_MAX; return 0;
    default: return -1; /* AVG never reaches a callback: flatshard divides */
  }
}

static inline void flatshard_mpi_widen_(const void *src, float *dst, uint64_t n, flatshard_dtype dt) {
  const uint16_t *s = (const uint16_t *)src;
  uint64_t i;
  for (i = 0; i < n; i++)
    dst[i] = dt == FLATSHARD_F16 ? flatshard_mpi_f16_to_f32_(s[i]) : flatshard_mpi_bf16_to_f32_(s[i]);
}

static inline void flatshard_mpi_narrow_(const float *src, void *dst, uint64_t n, flatshard_dtype dt) {
  uint16_t *d = (uint16_t *)dst;
  uint64_t i;
  for (i = 0; i < n; i++)
    d[i] = dt == FLATSHARD_F16 ? flatshard_mpi_f32_to_f16_(src[i]) : flatshard_mpi_f32_to_bf16_(src[i]);
}

static inline int32_t flatshard_mpi_all_reduce_(void *ctx, void *buf, uint64_t count,
                                                flatshard_dtype dt, flatshard_reduce_op op) {
  MPI_Comm c = ((flatshard_mpi_ctx_ *)ctx)->comm;
  MPI_Op mop;
  int rc;
  if (flatshard_mpi_op_(op, &mop) != 0) return -1;
  if (count > (uint64_t)INT_MAX) return -2;
  if (count == 0) return MPI_Barrier(c) == MPI_SUCCESS ? 0 : -3;
  if (flatshard_mpi_is_half_(dt)) {
    float *t = (float *)malloc((size_t)count * sizeof(float));
    if (t == NULL) return -4;
    flatshard_mpi_widen_(buf, t, count, dt);
    rc = MPI_Allreduce(MPI_IN_PLACE, t, (int)count, MPI_FLOAT, mop, c);
    if (rc == MPI_SUCCESS) flatshard_mpi_narrow_(t, buf, count, dt);
    free(t);
  } else {
    rc = MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, flatshard_mpi_type_(dt), mop, c);
  }
  return rc == MPI_SUCCESS ? 0 : rc;
}

static inline int32_t flatshard_mpi_all_gather_(void *ctx, const void *send, void *recv,
                                                uint64_t count, flatshard_dtype dt) {
  MPI_Comm c = ((flatshard_mpi_ctx_ *)ctx)->comm;
  uint64_t bytes = count * flatshard_mpi_elsize_(dt);
  if (bytes > (uint64_t)INT_MAX) return -2;
  if (count == 0) return MPI_Barrier(c) == MPI_SUCCESS ? 0 : -3;
  return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, c) == MPI_SUCCESS ? 0 : -3;
}

static inline int32_t flatshard_mpi_reduce_scatter_(void *ctx, const void *send, void *recv,
                                                    uint64_t count, flatshard_dtype dt,
                                                    flatshard_reduce_op op) {
  MPI_Comm c = ((flatshard_mpi_ctx_ *)ctx)->comm;
  MPI_Op mop;
  int size = 0, rc;
  if (flatshard_mpi_op_(op, &mop) != 0) return -1;
  if (MPI_Comm_size(c, &size) != MPI_SUCCESS) return -3;
  if (count > (uint64_t)INT_MAX || count * (uint64_t)size > (uint64_t)INT_MAX) return -2;
  if (count == 0) return MPI_Barrier(c) == MPI_SUCCESS ? 0 : -3;
  if (flatshard_mpi_is_half_(dt)) {
    uint64_t n = count * (uint64_t)size;
    float *t = (float *)malloc((size_t)(n + count) * sizeof(float));
    if (t == NULL) return -4;
    flatshard_mpi_widen_(send, t, n, dt);
    rc = MPI_Reduce_scatter_block(t, t + n, (int)count, MPI_FLOAT, mop, c);
    if (rc == MPI_SUCCESS) flatshard_mpi_narrow_(t + n, recv, count, dt);
    free(t);
  } else {
    rc = MPI_Reduce_scatter_block(send, recv, (int)count, flatshard_mpi_type_(dt), mop, c);
  }
  return rc == MPI_SUCCESS ? 0 : rc;
}

static inline int32_t flatshard_mpi_broadcast_(void *ctx, void *buf, uint64_t count,
                                               flatshard_dtype dt, int32_t root) {
  MPI_Comm c = ((flatshard_mpi_ctx_ *)ctx)->comm;
  uint64_t bytes = count * flatshard_mpi_elsize_(dt);
  if (bytes > (uint64_t)INT_MAX) return -2;
  if (count == 0) return MPI_Barrier(c) == MPI_SUCCESS ? 0 : -3;
  return MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, c) == MPI_SUCCESS ? 0 : -3;
}

static inline int32_t flatshard_mpi_barrier_(void *ctx) {
  return MPI_Barrier(((flatshard_mpi_ctx_ *)ctx)->comm) == MPI_SUCCESS ? 0 : -3;
}

static inline void flatshard_mpi_destroy_(void *ctx) {
  flatshard_mpi_ctx_ *m = (flatshard_mpi_ctx_ *)ctx;
  int finalized = 1;
  if (m == NULL) return;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&m->comm);
  free(m);
}

/* MPI moves the data: a user-callback communicator
 * (flatshard_comm_from_collectives) whose collectives are MPI's, on a
 * duplicate of mpi_comm; f16/bf16 are reduced in f32 as flatshard's own
 * transports do.
 *
 * Ownership: mpi_comm stays the caller's. The communicator owns its duplicate
 * (MPI_Comm_dup), freed when the communicator closes (flatshard_comm_free and
 * the frees of the flat params and averagers built on it), which must then
 * come before MPI_Finalize. On success *out owns the communicator: free it
 * with flatshard_comm_free.
 *
 * Threads: collective over mpi_comm: every rank calls it, after MPI_Init.
 * Later calls on the communicator call MPI from the thread that makes them,
 * or from the communicator's progress thread for asynchronous work, never two
 * at once: MPI_THREAD_SERIALIZED suffices, MPI_THREAD_FUNNELED when one
 * thread makes every call and no asynchronous work is issued.
 *
 * Statuses: those of flatshard_comm_from_collectives (with
 * flatshard_last_error() set); and, without a message: INVALID_ARGUMENT
 * (MPI_Comm_rank/size refused mpi_comm), OUT_OF_MEMORY, IO (MPI_Comm_dup
 * failed). Later, a failing MPI collective makes the flatshard call return
 * FLATSHARD_ERR_PEER_LOST and poisons the communicator; MPI's own errors
 * follow mpi_comm's error handler (fatal by default). */
static inline flatshard_status flatshard_comm_from_mpi(MPI_Comm mpi_comm, flatshard_comm **out) {
  flatshard_collectives ops;
  flatshard_mpi_ctx_ *m;
  int rank = 0, size = 0;
  flatshard_status s;
  if (out == NULL) return flatshard_comm_from_collectives(0, 1, NULL, out); /* reports `out` */
  if (MPI_Comm_rank(mpi_comm, &rank) != MPI_SUCCESS || MPI_Comm_size(mpi_comm, &size) != MPI_SUCCESS)
    return FLATSHARD_ERR_INVALID_ARGUMENT;
  m = (flatshard_mpi_ctx_ *)malloc(sizeof *m);
  if (m == NULL) return FLATSHARD_ERR_OUT_OF_MEMORY;
  if (MPI_Comm_dup(mpi_comm, &m->comm) != MPI_SUCCESS) {
    free(m);
    return FLATSHARD_ERR_IO;
  }
  memset(&ops, 0, sizeof ops);
  ops.struct_size = sizeof ops;
  ops.ctx = m;
  ops.all_reduce = flatshard_mpi_all_reduce_;
  ops.all_gather = flatshard_mpi_all_gather_;
  ops.reduce_scatter = flatshard_mpi_reduce_scatter_;
  ops.broadcast = flatshard_mpi_broadcast_;
  ops.barrier = flatshard_mpi_barrier_;
  ops.destroy = flatshard_mpi_destroy_;
  s = flatshard_comm_from_collectives(rank, size, &ops, out);
  if (s != FLATSHARD_OK) flatshard_mpi_destroy_(m);
  return s;
}

#ifdef __cplusplus
}
#endif

#endif /* FLATSHARD_MPI_H */
