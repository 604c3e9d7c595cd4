/* Helpers shared by the C test programs: checks that name the rank, dtype
 * conversion (f16/bf16 with round-to-nearest-even) for the sequential
 * references, and a clock. Every program is started once per rank by
 * tests/c_programs.rs with torchrun's variables set. */
#ifndef FS_TEST_H
#define FS_TEST_H

#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "flatshard.h"

static int g_rank = -1;

#define FAIL(...)                                                             \
  do {                                                                        \
    fprintf(stderr, "rank %d: %s:%d: ", g_rank, __FILE__, __LINE__);          \
    fprintf(stderr, __VA_ARGS__);                                             \
    fputc('\n', stderr);                                                      \
    exit(1);                                                                  \
  } while (0)

#define CHECK(cond, ...)                                                      \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "rank %d: %s:%d: check failed: %s: ", g_rank, __FILE__, \
              __LINE__, #cond);                                               \
      fprintf(stderr, __VA_ARGS__);                                           \
      fputc('\n', stderr);                                                    \
      exit(1);                                                                \
    }                                                                         \
  } while (0)

/* Expect an exact status; print the last error on any other. */
#define EXPECT_STATUS(call, want)                                             \
  do {                                                                        \
    flatshard_status st_ = (call);                                            \
    if (st_ != (want)) {                                                      \
      FAIL("%s returned %s, expected %s (last error: %s)", #call,             \
           flatshard_status_name(st_), flatshard_status_name(want),           \
           flatshard_last_error());                                           \
    }                                                                         \
  } while (0)

#define CHECK_OK(call) EXPECT_STATUS(call, FLATSHARD_OK)

static inline double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}

/* ---- f16 / bf16 <-> f32, round to nearest even ---------------------------- */

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) { /* zero or subnormal: man * 2^-24 */
    float v = (float)man * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow -> inf */
  if (a < 0x38800000u) {                                  /* subnormal or zero */
    /* value * 2^24 rounded to nearest even integer = the f16 mantissa */
    float v = bits_f32(a) * 16777216.0f;
    uint32_t m = (uint32_t)v;
    float rem = v - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return (uint16_t)(sign | m);
  }
  uint32_t e = (a >> 23) - 112u, man = a & 0x7fffffu;
  uint32_t h = (e << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

/* ---- dtype-generic element access ----------------------------------------- */

static const flatshard_dtype ALL_DTYPES[] = {FLATSHARD_F32, FLATSHARD_F64, FLATSHARD_F16,
                                             FLATSHARD_BF16, FLATSHARD_I32, FLATSHARD_I64,
                                             FLATSHARD_U8};
#define N_DTYPES (sizeof ALL_DTYPES / sizeof ALL_DTYPES[0])

static inline size_t dt_size(flatshard_dtype dt) {
  switch (dt) {
    case FLATSHARD_F64: case FLATSHARD_I64: return 8;
    case FLATSHARD_F32: case FLATSHARD_I32: return 4;
    case FLATSHARD_F16: case FLATSHARD_BF16: return 2;
    default: return 1;
  }
}
static inline const char *dt_name(flatshard_dtype dt) {
  static const char *names[] = {"f32", "f64", "f16", "bf16", "i32", "i64", "u8"};
  return (unsigned)dt < 7 ? names[dt] : "?";
}
static inline int dt_is_float(flatshard_dtype dt) { return dt <= FLATSHARD_BF16; }

/* Store v (already representable) as element i. */
static inline void put(void *buf, flatshard_dtype dt, size_t i, double v) {
  switch (dt) {
    case FLATSHARD_F32: ((float *)buf)[i] = (float)v; break;
    case FLATSHARD_F64: ((double *)buf)[i] = v; break;
    case FLATSHARD_F16: ((uint16_t *)buf)[i] = f32_to_f16((float)v); break;
    case FLATSHARD_BF16: ((uint16_t *)buf)[i] = f32_to_bf16((float)v); break;
    case FLATSHARD_I32: ((int32_t *)buf)[i] = (int32_t)v; break;
    case FLATSHARD_I64: ((int64_t *)buf)[i] = (int64_t)v; break;
    default: ((uint8_t *)buf)[i] = (uint8_t)v; break;
  }
}
static inline double get(const void *buf, flatshard_dtype dt, size_t i) {
  switch (dt) {
    case FLATSHARD_F32: return ((const float *)buf)[i];
    case FLATSHARD_F64: return ((const double *)buf)[i];
    case FLATSHARD_F16: return f16_to_f32(((const uint16_t *)buf)[i]);
    case FLATSHARD_BF16: return bf16_to_f32(((const uint16_t *)buf)[i]);
    case FLATSHARD_I32: return ((const int32_t *)buf)[i];
    case FLATSHARD_I64: return (double)((const int64_t *)buf)[i];
    default: return ((const uint8_t *)buf)[i];
  }
}
/* Round a double the way the library stores a result of dtype dt. */
static inline double round_to(flatshard_dtype dt, double v) {
  switch (dt) {
    case FLATSHARD_F32: return (float)v;
    case FLATSHARD_F16: return f16_to_f32(f32_to_f16((float)v));
    case FLATSHARD_BF16: return bf16_to_f32(f32_to_bf16((float)v));
    default: return v;
  }
}

/* Deterministic input: small integers so sums over up to 8 ranks are exact in
   every dtype (u8: non-negative and the sum stays below 256). */
static inline double value(int rank, size_t i, int salt, flatshard_dtype dt) {
  unsigned k = (unsigned)((i * 7u + (size_t)rank * 13u + (size_t)salt * 5u) % 17u);
  return dt == FLATSHARD_U8 ? (double)(k % 16u) : (double)k - 8.0;
}

static inline void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) FAIL("out of memory (%zu bytes)", n);
  return p;
}

/* Join the job torchrun-style; options from the environment the harness sets. */
static inline flatshard_comm *join(uint32_t timeout_ms) {
  flatshard_comm_options o;
  flatshard_comm_options_init(&o);
  o.timeout_ms = timeout_ms;
  const char *t = getenv("FS_TEST_TRANSPORT");
  if (t && strcmp(t, "tcp") == 0) o.transport = FLATSHARD_TRANSPORT_TCP;
  if (t && strcmp(t, "shm") == 0) o.transport = FLATSHARD_TRANSPORT_SHM;
  g_rank = env_int("RANK", -1);
  flatshard_comm *c = NULL;
  CHECK_OK(flatshard_comm_init_from_env(&o, &c));
  CHECK(flatshard_comm_rank(c) == g_rank, "rank %d", flatshard_comm_rank(c));
  return c;
}

#endif
