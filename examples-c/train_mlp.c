/*
 * flatshard demo: data-parallel training of a small MLP classifier, in C.
 *
 *   x[32] -> layer1 (64, ReLU) -> layer2 (64, ReLU) -> head (4 classes)
 *
 * layer1 and layer2 are FSDP flat parameters (FULL_SHARD): each rank stores
 * 1/W of them and gathers the full weights only around forward and backward.
 * The head is replicated and trained with local SGD: each rank steps on its own
 * gradients and a hierarchical averager syncs it (pairs every 2 steps, all ranks
 * every 4). Each rank trains on its own shard of a synthetic dataset.
 * Communication overlaps compute (API §7): the forward prefetches layer2's
 * gather (unshard_async) while layer1 computes, and the backward reduces
 * layer2's gradients (reduce_grads_async) while layer1's backward runs.
 * At the end rank 0 exports the full model (rank0_only + offload_to_cpu) as a
 * .safetensors file.
 *
 * Checkpoints (--ckpt DIR --save-every N): a sharded checkpoint that PyTorch
 * loads, saved after every N-th step (N a multiple of 4, from step 12 on: the
 * steps right after the head's all-rank averaging, so every rank holds the
 * same head). --resume DIR continues from one, with any number of ranks.
 *
 * Run: flatshard-run -n 4 -- ./train_mlp [--steps N] [--ckpt DIR --save-every N]
 *                                       [--resume DIR] [out.safetensors]
 *  or: torchrun --no-python --nproc-per-node 4 ./train_mlp
 */
#define _POSIX_C_SOURCE 200809L
#include "flatshard.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define D 32
#define H 64
#define C 4
#define BATCH 64
#define STEPS 300 /* default of --steps */
#define LR 0.05f

#define CHECK(call)                                                              \
  do {                                                                           \
    flatshard_status st_ = (call);                                               \
    if (st_ != FLATSHARD_OK) {                                                   \
      fprintf(stderr, "%s failed: %s: %s\n", #call, flatshard_status_name(st_), \
              flatshard_last_error());                                           \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

static uint64_t rng_state;
static float frand(void) { /* xorshift64*, uniform in [0,1) */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (float)((rng_state * 2685821657736338717ULL) >> 40) / (float)(1 << 24);
}
static float gauss(void) {
  float u = frand() + 1e-7f, v = frand();
  return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static flatshard_tensor cpu_tensor(float *data, float *grad, uint64_t numel) {
  flatshard_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.grad = grad;
  t.numel = numel;
  t.dtype = FLATSHARD_F32;
  t.device.type = FLATSHARD_DEVICE_CPU;
  return t;
}

/* Synthetic task: 4 Gaussian clusters in 32-d; class = cluster. */
static float centers[C][D];
static void make_batch(float *x, int *y) {
  for (int b = 0; b < BATCH; b++) {
    int c = (int)(frand() * C) % C;
    y[b] = c;
    for (int i = 0; i < D; i++) x[b * D + i] = centers[c][i] + 2.5f * gauss();
  }
}

/* y[b][o] = relu?(W x[b] + bias) */
static void linear(const float *W, const float *bias, const float *x, float *y, int in, int out,
                   int relu) {
  for (int b = 0; b < BATCH; b++)
    for (int o = 0; o < out; o++) {
      float s = bias[o];
      for (int i = 0; i < in; i++) s += W[o * in + i] * x[b * in + i];
      y[b * out + o] = (relu && s < 0) ? 0 : s;
    }
}

/* Given dy (already masked by ReLU'), accumulate dW, db (averaged over batch)
   and write dx = W^T dy. */
static void linear_back(const float *W, const float *x, const float *dy, float *dW, float *db,
                        float *dx, int in, int out) {
  for (int b = 0; b < BATCH; b++)
    for (int o = 0; o < out; o++) {
      float g = dy[b * out + o] / BATCH;
      db[o] += g;
      for (int i = 0; i < in; i++) dW[o * in + i] += g * x[b * in + i];
    }
  if (dx)
    for (int b = 0; b < BATCH; b++)
      for (int i = 0; i < in; i++) {
        float s = 0;
        for (int o = 0; o < out; o++) s += W[o * in + i] * dy[b * out + o];
        dx[b * in + i] = s;
      }
}

/* Queue the gathers of both layers (layer2's overlaps layer1's compute);
   views wait for their own gather. */
static void prefetch(flatshard_flat_param *first, flatshard_flat_param *second,
                     const flatshard_unshard_options *o, flatshard_work **w) {
  if (o) {
    CHECK(flatshard_flat_param_unshard_async(first, o, &w[0]));
    CHECK(flatshard_flat_param_unshard_async(second, o, &w[1]));
  } else { /* forward: no gradient buffers */
    CHECK(flatshard_flat_param_unshard_forward_async(first, &w[0]));
    CHECK(flatshard_flat_param_unshard_forward_async(second, &w[1]));
  }
}

static void finish(flatshard_work **w, int n) {
  for (int i = 0; i < n; i++) {
    CHECK(flatshard_work_wait(w[i]));
    flatshard_work_free(w[i]);
  }
}

static void sgd_shard(flatshard_flat_param *fp) {
  flatshard_tensor s;
  CHECK(flatshard_flat_param_shard(fp, &s));
  float *w = (float *)s.data, *g = (float *)s.grad;
  if (g)
    for (uint64_t i = 0; i < s.numel; i++) w[i] -= LR * g[i];
  CHECK(flatshard_flat_param_zero_grad(fp));
}

/* Write tensors as a .safetensors file: u64 header length, JSON header, data. */
static int write_safetensors(const char *path, const char **names, float **data,
                             const uint64_t shapes[][2], const int *ndims, int n) {
  char header[4096];
  size_t off = 0, pos = 0;
  pos += (size_t)snprintf(header + pos, sizeof header - pos, "{");
  for (int i = 0; i < n; i++) {
    uint64_t numel = shapes[i][0] * (ndims[i] == 2 ? shapes[i][1] : 1);
    if (ndims[i] == 2)
      pos += (size_t)snprintf(header + pos, sizeof header - pos,
                              "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%llu,%llu],\"data_offsets\":[%zu,%zu]}",
                              i ? "," : "", names[i], (unsigned long long)shapes[i][0],
                              (unsigned long long)shapes[i][1], off, off + numel * 4);
    else
      pos += (size_t)snprintf(header + pos, sizeof header - pos,
                              "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%llu],\"data_offsets\":[%zu,%zu]}",
                              i ? "," : "", names[i], (unsigned long long)shapes[i][0], off,
                              off + numel * 4);
    off += numel * 4;
  }
  pos += (size_t)snprintf(header + pos, sizeof header - pos, "}");
  while (pos % 8) header[pos++] = ' '; /* align the data section */
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  uint64_t hl = pos;
  unsigned char le[8];
  for (int i = 0; i < 8; i++) le[i] = (unsigned char)(hl >> (8 * i));
  fwrite(le, 1, 8, f);
  fwrite(header, 1, pos, f);
  for (int i = 0; i < n; i++) {
    uint64_t numel = shapes[i][0] * (ndims[i] == 2 ? shapes[i][1] : 1);
    fwrite(data[i], 4, numel, f);
  }
  return fclose(f);
}

/* ---- checkpoints: names and shapes of everything a resume needs ---- */
static const uint64_t S_W1[2] = {H, D}, S_W2[2] = {H, H}, S_B[1] = {H}, S_WH[2] = {C, H}, S_BH[1] = {C};
static const flatshard_param_info L1[2] = {{"layer1.weight", 2, S_W1}, {"layer1.bias", 1, S_B}};
static const flatshard_param_info L2[2] = {{"layer2.weight", 2, S_W2}, {"layer2.bias", 1, S_B}};
static const flatshard_param_info HW = {"head.weight", 2, S_WH}, HB = {"head.bias", 1, S_BH};
static const flatshard_param_info STEP = {"train.step", 0, NULL}, AVG_STEP = {"averager.step", 0, NULL};

/* Save (load = 0) or restore (load = 1) the sharded layers, the head and the steps. */
static void checkpoint(flatshard_comm *comm, const char *dir, int load, flatshard_flat_param *fp1,
                       flatshard_flat_param *fp2, flatshard_tensor *head, int64_t *steps) {
  flatshard_checkpoint *ck;
  int64_t *train_step = &steps[0], *avg_step = &steps[1];
  flatshard_tensor st = cpu_tensor(NULL, NULL, 1), av = st;
  st.dtype = av.dtype = FLATSHARD_I64;
  st.data = train_step;
  av.data = avg_step;
  if (load) {
    CHECK(flatshard_checkpoint_load_begin(comm, dir, &ck));
    CHECK(flatshard_checkpoint_load_flat_param(ck, fp1, L1, 2, NULL, NULL));
    CHECK(flatshard_checkpoint_load_flat_param(ck, fp2, L2, 2, NULL, NULL));
    CHECK(flatshard_checkpoint_load_tensor(ck, &HW, &head[0]));
    CHECK(flatshard_checkpoint_load_tensor(ck, &HB, &head[1]));
    CHECK(flatshard_checkpoint_load_tensor(ck, &STEP, &st));
    CHECK(flatshard_checkpoint_load_tensor(ck, &AVG_STEP, &av));
  } else {
    CHECK(flatshard_checkpoint_save_begin(comm, dir, &ck));
    CHECK(flatshard_checkpoint_save_flat_param(ck, fp1, L1, 2, NULL, NULL));
    CHECK(flatshard_checkpoint_save_flat_param(ck, fp2, L2, 2, NULL, NULL));
    CHECK(flatshard_checkpoint_save_tensor(ck, &HW, &head[0]));
    CHECK(flatshard_checkpoint_save_tensor(ck, &HB, &head[1]));
    CHECK(flatshard_checkpoint_save_tensor(ck, &STEP, &st));
    CHECK(flatshard_checkpoint_save_tensor(ck, &AVG_STEP, &av));
    CHECK(flatshard_checkpoint_commit(ck));
  }
  flatshard_checkpoint_free(ck);
}

int main(int argc, char **argv) {
  const char *out_path = "mlp.safetensors", *ckpt_dir = NULL, *resume_dir = NULL;
  int steps = STEPS, save_every = 0, start = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--save-every") && i + 1 < argc) save_every = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--ckpt") && i + 1 < argc) ckpt_dir = argv[++i];
    else if (!strcmp(argv[i], "--resume") && i + 1 < argc) resume_dir = argv[++i];
    else if (argv[i][0] != '-') out_path = argv[i];
    else { fprintf(stderr, "unknown or incomplete option %s\n", argv[i]); return 2; }
  }
  if (save_every % 4 != 0 || save_every < 0 || (save_every && !ckpt_dir)) {
    fprintf(stderr, "--save-every needs a multiple of 4 and --ckpt DIR\n");
    return 2;
  }
  flatshard_comm *comm;
  CHECK(flatshard_comm_init_from_env(NULL, &comm));
  int rank = flatshard_comm_rank(comm), world = flatshard_comm_size(comm);

  /* Same initial weights everywhere (sync_from_rank0 makes rank 0's win anyway). */
  rng_state = 42;
  for (int c = 0; c < C; c++)
    for (int i = 0; i < D; i++) centers[c][i] = gauss();
  static float w1[H * D], b1[H], w2[H * H], b2[H], wh[C * H], bh[C], gwh[C * H], gbh[C];
  for (int i = 0; i < H * D; i++) w1[i] = gauss() * sqrtf(2.0f / D);
  for (int i = 0; i < H * H; i++) w2[i] = gauss() * sqrtf(2.0f / H);
  for (int i = 0; i < C * H; i++) wh[i] = gauss() * sqrtf(1.0f / H);
  memset(b1, 0, sizeof b1);
  memset(b2, 0, sizeof b2);
  memset(bh, 0, sizeof bh);

  flatshard_flat_param_options fo;
  flatshard_flat_param_options_init(&fo);
  fo.sharding = FLATSHARD_FULL_SHARD;
  fo.sync_from_rank0 = 1;
  flatshard_tensor l1[2] = {cpu_tensor(w1, NULL, H * D), cpu_tensor(b1, NULL, H)};
  flatshard_tensor l2[2] = {cpu_tensor(w2, NULL, H * H), cpu_tensor(b2, NULL, H)};
  flatshard_flat_param *fp1, *fp2;
  CHECK(flatshard_flat_param_new(comm, l1, 2, &fo, &fp1));
  CHECK(flatshard_flat_param_new(comm, l2, 2, &fo, &fp2));

  /* Local SGD on the head: pairs average every 2 steps, everyone every 4. */
  uint64_t periods[2] = {2, 4};
  int32_t groups[2] = {2 < world ? 2 : world, world};
  flatshard_averager *avg;
  CHECK(flatshard_hierarchical_averager_new(comm, periods, groups, 2, 10, &avg));
  flatshard_tensor head[2] = {cpu_tensor(wh, gwh, C * H), cpu_tensor(bh, gbh, C)};
  if (resume_dir) { /* any number of ranks: each loads only its own shard */
    int64_t st[2];
    checkpoint(comm, resume_dir, 1, fp1, fp2, head, st);
    CHECK(flatshard_averager_set_step(avg, (uint64_t)st[1]));
    start = (int)st[0];
    if (rank == 0) printf("resumed from %s at step %d\n", resume_dir, start);
  }

  if (rank == 0)
    printf("flatshard %s: %d ranks, layer1+layer2 FULL_SHARD (%llu + %llu params, %llu + %llu per rank), "
           "head local-SGD\n%6s %9s %9s %9s\n",
           flatshard_version(), world, (unsigned long long)flatshard_flat_param_numel(fp1),
           (unsigned long long)flatshard_flat_param_numel(fp2),
           (unsigned long long)flatshard_flat_param_shard_numel(fp1),
           (unsigned long long)flatshard_flat_param_shard_numel(fp2), "step", "loss", "accuracy",
           "time_s");

  static float x[BATCH * D], h1[BATCH * H], h2[BATCH * H], logits[BATCH * C], dlog[BATCH * C],
      dh2[BATCH * H], dh1[BATCH * H];
  int y[BATCH];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  flatshard_unshard_options train;
  flatshard_unshard_options_init(&train); /* training gather: no writeback */
  float first_loss = -1, last_loss = 0, last_acc = 0;

  for (int step = start; step < steps; step++) {
    rng_state = 0x9E3779B97F4A7C15ULL * (uint64_t)(step + 1) + 1000 + (uint64_t)rank; /* each rank its own data */
    make_batch(x, y);
    flatshard_tensor v1w, v1b, v2w, v2b;
    flatshard_work *w[4];
    /* forward: gather (layer2's behind layer1's compute), compute, free (FULL_SHARD) */
    prefetch(fp1, fp2, NULL, w); /* NULL: forward-only unshards */
    CHECK(flatshard_flat_param_view(fp1, 0, &v1w)); /* waits for layer1's gather */
    CHECK(flatshard_flat_param_view(fp1, 1, &v1b));
    linear(v1w.data, v1b.data, x, h1, D, H, 1);
    CHECK(flatshard_flat_param_reshard(fp1));
    CHECK(flatshard_flat_param_view(fp2, 0, &v2w));
    CHECK(flatshard_flat_param_view(fp2, 1, &v2b));
    linear(v2w.data, v2b.data, h1, h2, H, H, 1);
    linear(wh, bh, h2, logits, H, C, 0);
    CHECK(flatshard_flat_param_reshard(fp2));
    finish(w, 2);

    /* loss + d(logits) */
    float loss = 0, correct = 0;
    for (int b = 0; b < BATCH; b++) {
      float m = logits[b * C], s = 0;
      int arg = 0;
      for (int c = 1; c < C; c++)
        if (logits[b * C + c] > m) m = logits[b * C + c], arg = c;
      for (int c = 0; c < C; c++) s += expf(logits[b * C + c] - m);
      loss += logf(s) - (logits[b * C + y[b]] - m);
      correct += arg == y[b];
      for (int c = 0; c < C; c++) dlog[b * C + c] = expf(logits[b * C + c] - m) / s - (c == y[b]);
    }

    /* backward: gather again (layer1's behind the head and layer2); grads go
       into the views' zero-filled grad buffers */
    prefetch(fp2, fp1, &train, w);
    memset(gwh, 0, sizeof gwh);
    memset(gbh, 0, sizeof gbh);
    linear_back(wh, h2, dlog, gwh, gbh, dh2, H, C);
    for (int i = 0; i < BATCH * H; i++) dh2[i] *= h2[i] > 0;
    CHECK(flatshard_flat_param_view(fp2, 0, &v2w));
    CHECK(flatshard_flat_param_view(fp2, 1, &v2b));
    linear_back(v2w.data, h1, dh2, v2w.grad, v2b.grad, dh1, H, H);
    /* mean over ranks into the shard grad, while layer1's backward runs */
    CHECK(flatshard_flat_param_reduce_grads_async(fp2, &w[2]));
    for (int i = 0; i < BATCH * H; i++) dh1[i] *= h1[i] > 0;
    CHECK(flatshard_flat_param_view(fp1, 0, &v1w));
    CHECK(flatshard_flat_param_view(fp1, 1, &v1b));
    linear_back(v1w.data, x, dh1, v1w.grad, v1b.grad, NULL, D, H);
    CHECK(flatshard_flat_param_reduce_grads_async(fp1, &w[3]));
    CHECK(flatshard_flat_param_reshard(fp1)); /* reshard waits for the reductions */
    CHECK(flatshard_flat_param_reshard(fp2));
    finish(w, 4);

    /* optimizer: sharded layers step on their shard; the head steps locally */
    sgd_shard(fp1);
    sgd_shard(fp2);
    for (int i = 0; i < C * H; i++) wh[i] -= LR * gwh[i];
    for (int i = 0; i < C; i++) bh[i] -= LR * gbh[i];
    int32_t averaged = 0;
    CHECK(flatshard_averager_step(avg, head, 2, 0, &averaged));

    float stats[2] = {loss / BATCH, correct / BATCH};
    CHECK(flatshard_all_reduce(comm, stats, 2, FLATSHARD_F32, FLATSHARD_AVG));
    if (first_loss < 0) first_loss = stats[0];
    last_loss = stats[0];
    last_acc = stats[1];
    if (save_every && step >= 12 && step % save_every == 0) { /* right after the all-rank head average */
      int64_t st[2] = {step + 1, (int64_t)flatshard_averager_get_step(avg)};
      checkpoint(comm, ckpt_dir, 0, fp1, fp2, head, st);
      if (rank == 0) printf("checkpoint after step %d in %s (loss %.9g)\n", step, ckpt_dir, stats[0]);
    }
    if (rank == 0 && (step % 25 == 0 || step == steps - 1)) {
      clock_gettime(CLOCK_MONOTONIC, &t1);
      printf("%6d %9.4f %8.1f%% %9.2f\n", step, stats[0], 100 * stats[1],
             (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
      fflush(stdout);
    }
  }

  /* Export: only rank 0 materialises the full parameters, in host memory. */
  flatshard_unshard_options exp;
  flatshard_unshard_options_init(&exp);
  exp.rank0_only = 1;
  exp.offload_to_cpu = 1;
  CHECK(flatshard_flat_param_unshard(fp1, &exp));
  CHECK(flatshard_flat_param_unshard(fp2, &exp));
  int rc = 0;
  if (rank == 0) { /* only rank 0 holds the full parameters */
    flatshard_tensor v[4];
    CHECK(flatshard_flat_param_view(fp1, 0, &v[0]));
    CHECK(flatshard_flat_param_view(fp1, 1, &v[1]));
    CHECK(flatshard_flat_param_view(fp2, 0, &v[2]));
    CHECK(flatshard_flat_param_view(fp2, 1, &v[3]));
    const char *names[6] = {"layer1.weight", "layer1.bias", "layer2.weight",
                            "layer2.bias",   "head.weight", "head.bias"};
    float *data[6] = {v[0].data, v[1].data, v[2].data, v[3].data, wh, bh};
    const uint64_t shapes[6][2] = {{H, D}, {H, 0}, {H, H}, {H, 0}, {C, H}, {C, 0}};
    const int ndims[6] = {2, 1, 2, 1, 2, 1};
    rc = write_safetensors(out_path, names, data, shapes, ndims, 6);
    double checksum = 0; /* lets a reader verify the file against the unsharded model */
    for (int i = 0; i < 6; i++) {
      uint64_t numel = shapes[i][0] * (ndims[i] == 2 ? shapes[i][1] : 1);
      for (uint64_t k = 0; k < numel; k++) checksum += (double)data[i][k] * (double)((k % 7) + 1);
    }
    if (rc == 0)
      printf("loss %.4f -> %.4f, accuracy %.1f%%; wrote %s (checksum %.6f)\nfinal loss %.9g\n",
             first_loss, last_loss, 100 * last_acc, out_path, checksum, last_loss);
    else
      fprintf(stderr, "could not write %s\n", out_path);
  }
  CHECK(flatshard_flat_param_reshard(fp1));
  CHECK(flatshard_flat_param_reshard(fp2));
  CHECK(flatshard_barrier(comm));
  flatshard_averager_free(avg);
  flatshard_flat_param_free(fp1);
  flatshard_flat_param_free(fp2);
  flatshard_comm_free(comm);
  return rc == 0 && (resume_dir || last_loss < first_loss) ? 0 : 1;
}
