"""The host-side logic of the CUDA backend, run without a GPU.

kernels/cuda_backend.c is compiled (as it is for the real build) against a
mock CUDA runtime and driver written below: host memory stands in for device
memory, kernels and cuBLAS do nothing, and the mock keeps, per thread, the
current device and context the way cudart/libcuda do. The mock is built as a
shared library; once with the soname libcuda.so.1 (so the backend finds the
driver's context calls, as it does next to a real cudart) and once without
(the cudaSetDevice fallback). The C program then checks:

- every entry point (create, alloc, upload, forward ops, download, free,
  destroy, mem_info) runs with the backend's device current and gives the
  calling thread its device and context back; a thread with no context gets
  none back and no context is created on another device;
- the pinned pool: results are served from it (cudaHostAlloc once per size
  class), go back to it when released (also after the model and backend are
  freed), are freed when the pool holds its cap, stay within 25 % of the
  requested size, and survive 8 threads allocating and releasing at once
  (each block used by one thread at a time, counters balanced at the end).

A second program runs Gemma-like and OLMo-2-like configs through the real
engine and backend on the same mock, whose kernel launchers log their
parameters: the configs pass the CUDA capabilities, and each launch gets
what the layer needs (window on sliding layers only and their own RoPE
frequencies, scale, soft-cap, norm offset, pre-/post-norm modes, GeGLU, the
residual cast of layers without pre-norms, in bf16 and fp32 storage); the ops
refuse bad parameters by name.

Two more run the engine on the mock to check the backend's behaviour around
the device: a kernel launch made to fault (the mock's sticky error: every later
call on that device fails) poisons the device with one message, and every
later call fails fast with it (with and without RJEPA_CUDA_SYNC=1); and a
forward waits once and downloads once per batch (the mock counts
cudaStreamSynchronize / cudaEventSynchronize calls and device-to-host copies;
its pool kernel writes what made each row, so misplaced rows show). The
handle's cuBLAS math mode is checked too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cuda_include() -> Path | None:
    from test_cuda_build import _cuda_include as find
    return find()


MOCK_C = r"""
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cuda_internal.h"
#include "cuda_dequant.h"

/* ---- state: per thread device and context; primary contexts; counters ---- */
#define NDEV 2
typedef struct { int device; int active; } mock_ctx;
static mock_ctx primary[NDEV] = {{0, 0}, {1, 0}};
static __thread int cur_dev = 0;          /* cudart's per-thread device (default 0) */
static __thread mock_ctx *cur_ctx = NULL; /* the driver's current context */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
long mock_host_allocs, mock_host_frees, mock_wrong_device, mock_portable_missing;
int mock_expect_device = -1;              /* what the next device work must see */
long mock_stream_syncs, mock_event_syncs; /* cudaStreamSynchronize / cudaEventSynchronize calls */
/* fault injection: the launch of `mock_fault_op` after `mock_fault_skip` others of it
 * "faults" like a kernel that reads an illegal address: the launch itself succeeds,
 * then every later call that touches that device fails with the sticky error */
const char *mock_fault_op;
int mock_fault_skip;
static cudaError_t mock_sticky[NDEV];

int mock_primary_active(int d) { return primary[d].active; }
int mock_current_device(void) { return cur_dev; }
void *mock_current_ctx(void) { return cur_ctx; }
void mock_make_current(int d) { primary[d].active = 1; cur_ctx = &primary[d]; cur_dev = d; }

static int dev_now(void) { return cur_ctx ? cur_ctx->device : cur_dev; }
static cudaError_t sticky(void) { return mock_sticky[dev_now()]; }
static void seen(void)
{
    if (mock_expect_device >= 0 && (cur_dev != mock_expect_device || !cur_ctx ||
                                    cur_ctx->device != mock_expect_device)) {
        pthread_mutex_lock(&mu);
        mock_wrong_device++;
        pthread_mutex_unlock(&mu);
    }
}

/* ---- runtime ---- */
cudaError_t cudaGetDevice(int *d) { *d = cur_ctx ? cur_ctx->device : cur_dev; return cudaSuccess; }
cudaError_t cudaSetDevice(int d)
{
    if (d < 0 || d >= NDEV) return cudaErrorInvalidDevice;
    primary[d].active = 1;    /* like CUDA 12+: it initializes the primary context */
    cur_ctx = &primary[d];
    cur_dev = d;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int *n) { *n = NDEV; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d)
{
    *v = a == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
    return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
/* a sticky error is never cleared */
cudaError_t cudaGetLastError(void) { return sticky(); }
cudaError_t cudaPeekAtLastError(void) { return sticky(); }
const char *cudaGetErrorName(cudaError_t e) { return "mockError"; }
const char *cudaGetErrorString(cudaError_t e) { return "mock error"; }
cudaError_t cudaMemGetInfo(size_t *f, size_t *t) { seen(); *f = (size_t)64 << 30; *t = (size_t)80 << 30; return cudaSuccess; }
cudaError_t cudaMalloc(void **p, size_t n)
{
    seen();
    *p = NULL;
    return posix_memalign(p, 256, n ? n : 1) ? cudaErrorMemoryAllocation : cudaSuccess;
}
cudaError_t cudaFree(void *p) { seen(); free(p); return cudaSuccess; }
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned int flags)
{
    *p = NULL;
    if (posix_memalign(p, 4096, n ? n : 1)) return cudaErrorMemoryAllocation;
    pthread_mutex_lock(&mu);
    mock_host_allocs++;
    pthread_mutex_unlock(&mu);
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void *p)
{
    free(p);
    pthread_mutex_lock(&mu);
    mock_host_frees++;
    pthread_mutex_unlock(&mu);
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int f) { seen(); *s = (cudaStream_t)malloc(8); return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t s) { seen(); free(s); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int f) { seen(); *e = (cudaEvent_t)malloc(8); return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    seen();
    pthread_mutex_lock(&mu);
    mock_stream_syncs++;
    pthread_mutex_unlock(&mu);
    return sticky();
}
cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    pthread_mutex_lock(&mu);
    mock_event_syncs++;
    pthread_mutex_unlock(&mu);
    return sticky();
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { seen(); return sticky(); }
long mock_d2h_copies;                     /* cudaMemcpyAsync device -> host */
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, enum cudaMemcpyKind k, cudaStream_t st)
{
    seen();
    if (sticky()) return sticky();
    if (k == cudaMemcpyDeviceToHost) mock_d2h_copies++;
    memcpy(d, s, n);
    return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p)
{
    seen();
    memset(a, 0, sizeof *a);
    a->type = cudaMemoryTypeDevice;
    a->device = cur_dev;
    return cudaSuccess;
}

/* ---- driver context calls (found only when this library is libcuda.so.1) ---- */
int cuCtxGetCurrent(void **c) { *c = cur_ctx; return 0; }
int cuCtxSetCurrent(void *c) { cur_ctx = c; if (c) cur_dev = ((mock_ctx *)c)->device; return 0; }
int cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return 0; }
int cuDevicePrimaryCtxGetState(int dev, unsigned *flags, int *active)
{
    *flags = 0;
    *active = primary[dev].active;
    return 0;
}

/* ---- kernels and cuBLAS: no work, but they must run on the right device ---- */
/* Each launch is also logged (op, its parameters) for the wiring checks. */
typedef struct { char op[16]; int i[4]; float f[3]; const void *p; long long n; } mock_call;
#define MOCK_LOG_MAX 4096
mock_call mock_log[MOCK_LOG_MAX];
int mock_nlog;
/* what a launch returns: the device's sticky error, or success (and the launch
 * that is to fault makes the error sticky for everything after it) */
static cudaError_t launched(const char *op)
{
    if (sticky()) return sticky();
    if (mock_fault_op && strcmp(op, mock_fault_op) == 0 && mock_fault_skip-- == 0)
        mock_sticky[dev_now()] = cudaErrorIllegalAddress;
    return cudaSuccess;
}
static void logc(const char *op, int i0, int i1, int i2, int i3, float f0, float f1, float f2,
                 const void *p, long long n)
{
    pthread_mutex_lock(&mu);
    if (mock_nlog < MOCK_LOG_MAX) {
        mock_call *c = &mock_log[mock_nlog++];
        strncpy(c->op, op, sizeof c->op - 1);
        c->op[sizeof c->op - 1] = 0;
        c->i[0] = i0; c->i[1] = i1; c->i[2] = i2; c->i[3] = i3;
        c->f[0] = f0; c->f[1] = f1; c->f[2] = f2;
        c->p = p;
        c->n = n;
    }
    pthread_mutex_unlock(&mu);
}
cudaError_t rl_k_embed(cudaStream_t s, const int32_t *t, int64_t T, const void *tab, int f, int64_t d, float scale, float *x)
{ seen(); logc("embed", f, 0, 0, 0, scale, 0, 0, x, T); return launched("embed"); }
cudaError_t rl_k_rmsnorm(cudaStream_t s, const void *x, int xf, const void *w, int wf, float off, void *y, int out, int64_t r, int64_t d, float e)
{ seen(); logc("rmsnorm", xf, wf, out, 0, off, e, 0, y, r * d); return launched("rmsnorm"); }
cudaError_t rl_k_bias_rows(cudaStream_t s, void *y, int yf, const void *b, int bf, int64_t M, int64_t N, int add) { seen(); return launched("bias"); }
cudaError_t rl_k_qk_norm_rope(cudaStream_t s, void *q, int f, int64_t T, int64_t nh, int64_t nkv, int64_t hd, const void *qn, const void *kn, int whole, float off, float e, const float *inv, const int32_t *pos)
{ seen(); logc("qk", f, whole, qn != NULL && kn != NULL, 0, off, e, 0, inv, T); return launched("qk"); }
int rl_k_attention_supports(int64_t hd) { return hd == 16 || hd == 32 || hd == 64 || hd == 80 || hd == 96 || hd == 128 || hd == 256; }
cudaError_t rl_k_attention(cudaStream_t s, const void *q, void *o, int f, const int32_t *cu, int64_t B, int64_t L, int64_t nh, int64_t nkv, int64_t hd, float sc, float cap, int64_t window, int mma)
{ seen(); logc("attention", f, (int)window, mma, 0, sc, cap, 0, o, B); return launched("attention"); }
cudaError_t rl_k_glu(cudaStream_t s, const void *g, void *o, int f, int64_t T, int64_t ff, int act)
{ seen(); logc("glu", f, act, 0, 0, 0, 0, 0, o, T * ff); return launched("glu"); }
cudaError_t rl_k_cast(cudaStream_t s, const void *src, int sf, void *dst, int df, int64_t n)
{ seen(); logc("cast", sf, df, 0, 0, 0, 0, 0, dst, n); return launched("cast"); }
/* the mock model keeps no weight quantized: the dequantization kernels are never reached */
int rl_k_dequant_supports(int t) { (void)t; return 0; }
cudaError_t rl_k_dequant_gguf(cudaStream_t s, int t, const void *b, size_t rb, int64_t c, int64_t r0, int64_t r1, void *o, int f)
{ seen(); return launched("dequant"); }
cudaError_t rl_k_dequant_gather(cudaStream_t s, int t, const void *b, size_t rb, int64_t c, const int32_t *tok, int64_t T, float *x, float sc, int r)
{ seen(); return launched("dequant_gather"); }
int rl_k_dequant_hf_supports(const rl_qtensor *q) { (void)q; return 0; }
cudaError_t rl_k_dequant_hf(cudaStream_t s, const rl_qtensor *q, int64_t r0, int64_t r1, void *o, int f)
{ seen(); return launched("dequant_hf"); }
cudaError_t rl_k_dequant_hf_gather(cudaStream_t s, const rl_qtensor *q, const int32_t *tok, int64_t T, float *x, float sc, int r)
{ seen(); return launched("dequant_hf_gather"); }
/* pooled rows say what made them: 100000 * (decoder layers run so far: the
 * hidden-state index) + 10000 * mode + the span's absolute start */
cudaError_t rl_k_pool(cudaStream_t s, const void *x, int f, int64_t d, const int32_t *sp, int64_t S, int mode, float *out)
{
    seen();
    int layers_run = 0;
    for (int k = 0; k < mock_nlog; k++) layers_run += strcmp(mock_log[k].op, "attention") == 0;
    cudaError_t e = launched("pool");
    if (e) return e;
    for (int64_t i = 0; i < S; i++)
        for (int64_t c = 0; c < d; c++)
            out[i * d + c] = (float)(100000 * layers_run + 10000 * mode + sp[2 * i]);
    logc("pool", mode, 0, 0, 0, 0, 0, 0, out, S);
    return cudaSuccess;
}

static rl_cublas_status b_create(rl_cublas_handle *h) { seen(); *h = (rl_cublas_handle)malloc(8); return 0; }
static rl_cublas_status b_destroy(rl_cublas_handle h) { seen(); free(h); return 0; }
static rl_cublas_status b_stream(rl_cublas_handle h, cudaStream_t s) { return 0; }
static rl_cublas_status b_ws(rl_cublas_handle h, void *w, size_t n) { return 0; }
int mock_math_mode = -1;
static rl_cublas_status b_math(rl_cublas_handle h, int m) { mock_math_mode = m; return 0; }
static rl_cublas_status b_gemm(rl_cublas_handle h, int ta, int tb, int m, int n, int k, const void *al,
                               const void *A, int at, int lda, const void *B, int bt, int ldb,
                               const void *be, void *C, int ct, int ldc, int comp, int algo)
{ seen(); return launched("gemm") ? 13 /* CUBLAS_STATUS_EXECUTION_FAILED */ : 0; }
static rl_cublas_status b_version(rl_cublas_handle h, int *v) { *v = 130100; return 0; }
rl_status rl_cublas_load(rl_cublas_api *api)
{
    memset(api, 0, sizeof *api);
    api->create = b_create; api->destroy = b_destroy; api->set_stream = b_stream;
    api->set_workspace = b_ws; api->set_math_mode = b_math; api->gemm_ex = b_gemm;
    api->get_version = b_version;
    return RL_OK;
}
void rl_cublas_unload(rl_cublas_api *api) { api->lib = NULL; }
"""

MAIN_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "engine.h"
#include "cuda_internal.h"

extern long mock_host_allocs, mock_host_frees, mock_wrong_device;
extern int mock_expect_device, mock_math_mode;
int mock_primary_active(int d);
int mock_current_device(void);
void *mock_current_ctx(void);
void mock_make_current(int d);

static int failures;
#define CHECK(c) do { if (!(c)) { failures++; fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, #c, rl_last_error()); } } while (0)

static rl_config tiny(void)
{
    rl_config c = {.vocab_size = 11, .hidden_size = 16, .intermediate_size = 32, .num_layers = 2,
                   .num_heads = 2, .num_kv_heads = 1, .head_dim = 16, .max_layer = 2,
                   .rms_norm_eps = 1e-6};
    return c;
}

/* Loads and runs a tiny model on `be` (taken); returns its result. */
static rl_result run_model(rl_backend *be, int dev, rl_model **keep)
{
    rl_result res = {0};
    rl_config c = tiny();
    rl_model *m = NULL;
    mock_expect_device = dev;
    CHECK(rl_model_create(&c, be, &m) == RL_OK);
    if (!m) return res;
    static float buf[11 * 64];
    for (int k = 0; k < RL_T_COUNT; k++)
        for (int64_t l = 0; l < (rl_tensor_kind_is_global((rl_tensor_kind)k) ? 1 : 2); l++) {
            int64_t s[2];
            int nd = rl_tensor_shape(&c, (rl_tensor_kind)k, s);
            if (nd) CHECK(rl_model_set_tensor(m, (rl_tensor_kind)k, l, buf, RL_F32, s, nd) == RL_OK);
        }
    CHECK(rl_model_reserve(m, 16) == RL_OK);
    int32_t tok[5] = {1, 2, 3, 4, 5}, cu[3] = {0, 2, 5}, layers[2] = {0, 2}, spans[4] = {0, 2, 0, 3},
            seq[2] = {0, 1};
    rl_pool mean = RL_POOL_MEAN;
    rl_batch b = {tok, 5, cu, 2, layers, 2, spans, seq, 2, &mean, 1};
    CHECK(rl_model_forward(m, &b, &res) == RL_OK);
    CHECK(rl_model_verify_resident(m) == RL_OK);
    size_t f, t;
    CHECK(rl_model_backend(m)->mem_info(rl_model_backend(m), &f, &t) == RL_OK && t > 0);
    *keep = m;
    return res;
}

typedef struct { rl_backend *be; int id; long bad; } worker_arg;

static void *worker(void *p)
{
    worker_arg *a = p;
    unsigned seed = 1234u + (unsigned)a->id;
    for (int i = 0; i < 3000; i++) {
        size_t n = 1 + (size_t)(rand_r(&seed) % (300 * 1024));
        unsigned char *q = NULL;
        if (a->be->host_alloc(a->be, (void **)&q, n) != RL_OK || !q) { a->bad++; continue; }
        memset(q, a->id, n);
        if (i % 7 == 0) sched_yield();
        for (size_t j = 0; j < n; j += 997) if (q[j] != (unsigned char)a->id) { a->bad++; break; }
        if (q[n - 1] != (unsigned char)a->id) a->bad++;
        a->be->host_release(q);
    }
    return NULL;
}

static void *fresh_thread(void *p)
{
    rl_backend *be = p;
    /* no context current, device 0 has none: work on device 1 must leave both so */
    int *out = calloc(4, sizeof *out);
    void *d = NULL;
    out[0] = be->alloc(be, &d, 1024) == RL_OK;
    be->free(be, d);
    out[1] = mock_current_ctx() == NULL;
    out[2] = mock_primary_active(0);
    return out;
}

int main(void)
{
    setenv("RJEPA_PINNED_POOL_MB", "8", 1);
    void *drv = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    const int ctx_api = drv != NULL;
    printf("ctx_api %d\n", ctx_api);

    /* a fresh thread first (before anything made device 0's context) */
    rl_backend *be1 = NULL;
    {
        pthread_t th;
        /* creating the backend happens on this (main) thread, which has no context yet */
        mock_expect_device = 1;
        CHECK(rl_backend_cuda_create_ex(1, RL_BF16, &be1) == RL_OK);
        /* no TF32, and split-K partial sums in f32 (cuBLAS's values: 0 | 16) */
        CHECK(mock_math_mode == (RL_CUBLAS_DEFAULT_MATH |
                                 RL_CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) &&
              mock_math_mode == 16);
        if (ctx_api) {
            CHECK(mock_current_ctx() == NULL);     /* none before, none after */
            CHECK(!mock_primary_active(0));        /* and no context made on device 0 (the
                                                      runtime may report device 1 now) */
        } else {
            CHECK(mock_current_device() == 0);     /* cudaSetDevice(0) restores the report */
        }
        pthread_create(&th, NULL, fresh_thread, be1);
        int *r;
        pthread_join(th, (void **)&r);
        CHECK(r[0]);
        if (ctx_api) CHECK(r[1] && !r[2]);
        free(r);
    }

    /* a thread whose current device is 0 (like torch's) runs a model on device 1 */
    mock_make_current(0);
    void *ctx0 = mock_current_ctx();
    rl_model *m1 = NULL;
    rl_result r1 = run_model(be1, 1, &m1);
    CHECK(mock_current_device() == 0 && mock_current_ctx() == ctx0);
    CHECK(r1.data != NULL && r1.n_layers == 2 && r1.n_spans == 2);

    /* and one on device 0 while device 1 is current */
    rl_backend *be0 = NULL;
    mock_make_current(1);
    void *ctx1 = mock_current_ctx();
    mock_expect_device = 0;
    CHECK(rl_backend_cuda_create_ex(0, RL_F32, &be0) == RL_OK);
    rl_model *m0 = NULL;
    rl_result r0 = run_model(be0, 0, &m0);
    CHECK(mock_current_device() == 1 && mock_current_ctx() == ctx1);
    size_t fr, tot;
    mock_expect_device = 0;
    CHECK(rl_cuda_mem_info(0, &fr, &tot) == RL_OK && tot > 0);
    CHECK(mock_current_device() == 1);
    CHECK(mock_wrong_device == 0);

    /* results outlive their model and backend; their blocks go back to the pool */
    mock_expect_device = -1;
    long allocs = mock_host_allocs, frees = mock_host_frees;
    rl_model_free(m0);
    rl_model_free(m1);
    rl_pinned_pool_stats st;
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.live_bytes > 0 && st.cap_bytes == (size_t)8 << 20);
    memset(r1.data, 1, (size_t)r1.n_layers * r1.n_spans * r1.hidden * 4);
    rl_result_free(&r1);
    rl_result_free(&r0);
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.live_bytes == 0 && st.cached_bytes > 0);
    CHECK(mock_host_frees - frees == 4);            /* the two backends' staging buffers only */
    (void)allocs;

    /* a new backend reuses a cached block: no cudaHostAlloc for the result */
    mock_make_current(0);
    CHECK(rl_backend_cuda_create_ex(1, RL_BF16, &be1) == RL_OK);
    void *p = NULL;
    uint64_t reused = st.reused;
    allocs = mock_host_allocs;
    CHECK(be1->host_alloc(be1, &p, 2 * 16 * 4) == RL_OK && ((uintptr_t)p & 63) == 0);
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.reused == reused + 1 && mock_host_allocs == allocs);
    be1->host_release(p);

    /* size classes: live bytes within [n + header, 1.25 (n + header)] */
    for (size_t n = 1; n < ((size_t)3 << 20); n = n * 3 + 7) {
        rl_pinned_pool_stats a, b;
        rl_cuda_pinned_pool_stats(&a);
        CHECK(be1->host_alloc(be1, &p, n) == RL_OK);
        rl_cuda_pinned_pool_stats(&b);
        size_t got = b.live_bytes - a.live_bytes, need = n + 64;
        CHECK(got >= need && (got <= need + need / 4 || got == 4096));
        be1->host_release(p);
    }

    /* a second release of the same block is ignored (it is not put in the pool twice) */
    {
        rl_pinned_pool_stats a, b;
        CHECK(be1->host_alloc(be1, &p, 1000) == RL_OK);
        be1->host_release(p);
        rl_cuda_pinned_pool_stats(&a);
        be1->host_release(p);
        rl_cuda_pinned_pool_stats(&b);
        CHECK(a.cached_bytes == b.cached_bytes && a.live_bytes == b.live_bytes);
        void *p2 = NULL, *p3 = NULL;
        CHECK(be1->host_alloc(be1, &p2, 1000) == RL_OK && be1->host_alloc(be1, &p3, 1000) == RL_OK);
        CHECK(p2 != p3);
        be1->host_release(p2);
        be1->host_release(p3);
    }

    /* over the cap: releasing frees; trim empties the pool */
    rl_cuda_pinned_pool_trim();
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.cached_bytes == 0 && st.live_bytes == 0);
    void *big[3];
    for (int i = 0; i < 3; i++) CHECK(be1->host_alloc(be1, &big[i], (size_t)3 << 20) == RL_OK);
    frees = mock_host_frees;
    for (int i = 0; i < 3; i++) be1->host_release(big[i]);
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.cached_bytes <= st.cap_bytes && st.cached_bytes > 0);
    CHECK(mock_host_frees - frees == 1);            /* 2 x 3.5 MiB cached, the third freed */

    /* 8 threads at once */
    pthread_t th[8];
    worker_arg args[8];
    for (int i = 0; i < 8; i++) {
        args[i] = (worker_arg){be1, i + 1, 0};
        pthread_create(&th[i], NULL, worker, &args[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        CHECK(args[i].bad == 0);
    }
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.live_bytes == 0 && st.cached_bytes <= st.cap_bytes);
    CHECK(st.allocated == st.freed + 0 || st.cached_bytes > 0);
    be1->destroy(be1);
    rl_cuda_pinned_pool_trim();
    rl_cuda_pinned_pool_stats(&st);
    CHECK(st.cached_bytes == 0 && st.allocated == st.freed);
    CHECK(mock_current_device() == 0);
    CHECK(mock_wrong_device == 0);
    printf("reused %llu allocated %llu freed %llu failures %d\n", (unsigned long long)st.reused,
           (unsigned long long)st.allocated, (unsigned long long)st.freed, failures);
    return failures != 0;
}
"""


WIRING_C = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "engine.h"
#include "cuda_internal.h"

typedef struct { char op[16]; int i[4]; float f[3]; const void *p; long long n; } mock_call;
extern mock_call mock_log[];
extern int mock_nlog;
extern int mock_expect_device;

static int failures;
#define CHECK(c) do { if (!(c)) { failures++; fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, #c, rl_last_error()); } } while (0)

static rl_config base(int64_t L)
{
    rl_config c = {.vocab_size = 11, .hidden_size = 16, .intermediate_size = 32, .num_layers = L,
                   .num_heads = 2, .num_kv_heads = 1, .head_dim = 16, .max_layer = L,
                   .rms_norm_eps = 1e-6};
    return c;
}

/* the i-th logged launch of `op` (NULL when there are fewer) */
static const mock_call *nth(const char *op, int i)
{
    for (int k = 0; k < mock_nlog; k++)
        if (strcmp(mock_log[k].op, op) == 0 && i-- == 0) return &mock_log[k];
    return NULL;
}
static int count(const char *op)
{
    int n = 0;
    while (nth(op, n)) n++;
    return n;
}

/* Loads `c` on a fresh CUDA backend of storage `dt` and runs one forward of
 * 5 tokens in 2 sequences to the last hidden index; the log then holds the
 * forward's launches. 0 on success. */
static int run(const rl_config *c, rl_dtype dt)
{
    rl_backend *be = NULL;
    mock_expect_device = 0;
    CHECK(rl_backend_cuda_create_ex(0, dt, &be) == RL_OK);
    if (!be) return -1;
    rl_model *m = NULL;
    if (rl_model_create(c, be, &m) != RL_OK) {
        failures++;
        fprintf(stderr, "FAIL rl_model_create: %s\n", rl_last_error());
        return -1;
    }
    static float buf[64 * 64];
    for (int k = 0; k < RL_T_COUNT; k++)
        for (int64_t l = 0; l < (rl_tensor_kind_is_global((rl_tensor_kind)k) ? 1 : c->num_layers); l++) {
            int64_t s[2];
            int nd = rl_tensor_shape(c, (rl_tensor_kind)k, s);
            if (nd) CHECK(rl_model_set_tensor(m, (rl_tensor_kind)k, l, buf, RL_F32, s, nd) == RL_OK);
        }
    CHECK(rl_model_check_complete(m) == RL_OK);
    CHECK(rl_model_reserve(m, 16) == RL_OK);
    int32_t tok[5] = {1, 2, 3, 4, 5}, cu[3] = {0, 2, 5}, layers[1] = {(int32_t)c->num_layers},
            spans[4] = {0, 2, 0, 3}, seq[2] = {0, 1};
    rl_pool mean = RL_POOL_MEAN;
    rl_batch b = {tok, 5, cu, 2, layers, 1, spans, seq, 2, &mean, 1};
    rl_result res = {0};
    mock_nlog = 0;
    rl_status st = rl_model_forward(m, &b, &res);
    CHECK(st == RL_OK);
    rl_result_free(&res);
    rl_model_free(m);
    return st == RL_OK ? 0 : -1;
}

/* Gemma-3-like (and Gemma-2's soft-cap): embedding scale, (1 + w) norms, pre+post norms,
 * GeGLU, per-head q/k norm, a custom scale, soft-capping, a window on layers 0 and 1
 * with their own RoPE frequencies. */
static void gemma_like(void)
{
    rl_config c = base(3);
    c.embed_scale = 4.0f;
    c.norm_offset = 1.0f;
    c.act = RL_ACT_GELU_TANH;
    c.norms = RL_NORMS_PRE_POST;
    c.qk_norm = RL_QK_NORM_HEAD;
    c.attn_scale = 0.125f;
    c.attn_softcap = 50.0f;
    c.sliding_window = 4;
    c.layer_sliding[0] = c.layer_sliding[1] = 1;
    c.rope_swa = 1;
    rl_backend_caps caps;
    CHECK(rl_backend_caps_get(0, &caps) == RL_OK);
    CHECK(rl_caps_check_config(&caps, "cuda:0", &c, RL_BF16) == RL_OK);
    if (run(&c, RL_BF16) != 0) return;
    const mock_call *e = nth("embed", 0);
    CHECK(count("embed") == 1 && e && e->f[0] == 4.0f);
    CHECK(count("cast") == 0);
    CHECK(count("attention") == 3 && count("qk") == 3 && count("glu") == 3);
    for (int l = 0; l < 3; l++) {
        const mock_call *a = nth("attention", l), *q = nth("qk", l), *g = nth("glu", l);
        if (!a || !q || !g) break;
        CHECK(a->i[1] == (l < 2 ? 4 : 0));                  /* window on sliding layers only */
        CHECK(a->f[0] == 0.125f && a->f[1] == 50.0f && a->i[2] == 1);
        CHECK(q->i[1] == 0 && q->i[2] == 1 && q->f[0] == 1.0f);
        CHECK(g->i[1] == RL_K_ACT_GELU_TANH);
    }
    /* sliding layers rotate with the other frequencies */
    if (count("qk") == 3) CHECK(nth("qk", 0)->p == nth("qk", 1)->p && nth("qk", 0)->p != nth("qk", 2)->p);
    /* per layer: pre-norm (f32 residual -> bf16), post-norm (bf16 -> += residual), twice; final */
    CHECK(count("rmsnorm") == 3 * 4 + 1);
    for (int k = 0; k < 12 && nth("rmsnorm", k); k++) {
        const mock_call *r = nth("rmsnorm", k);
        int post = k % 2 == 1;
        CHECK(r->i[0] == !post && r->i[2] == (post ? RL_K_NORM_ADD_F32 : RL_K_NORM_BF16));
        CHECK(r->f[0] == 1.0f && r->n == 5 * 16);
    }
    const mock_call *fin = nth("rmsnorm", 12);
    CHECK(fin && fin->i[0] == 1 && fin->i[2] == RL_K_NORM_F32 && fin->f[0] == 1.0f);
}

/* OLMo-2-like: post-norms only (the residual cast to the GEMM operand), q/k norm
 * over the whole projection, SwiGLU; in both storage modes. */
static void olmo_like(rl_dtype dt)
{
    rl_config c = base(2);
    c.norms = RL_NORMS_POST;
    c.qk_norm = RL_QK_NORM_PROJ;
    if (run(&c, dt) != 0) return;
    const int f32 = dt == RL_F32;
    CHECK(nth("embed", 0) && nth("embed", 0)->f[0] == 1.0f);
    CHECK(count("cast") == 4);
    for (int k = 0; k < 4 && nth("cast", k); k++)
        CHECK(nth("cast", k)->i[0] == 1 && nth("cast", k)->i[1] == f32 && nth("cast", k)->n == 5 * 16);
    CHECK(count("rmsnorm") == 2 * 2 + 1);
    for (int k = 0; k < 4 && nth("rmsnorm", k); k++)
        CHECK(nth("rmsnorm", k)->i[0] == f32 && nth("rmsnorm", k)->i[2] == RL_K_NORM_ADD_F32 &&
              nth("rmsnorm", k)->f[0] == 0.0f);
    for (int l = 0; l < 2 && nth("qk", l) && nth("attention", l) && nth("glu", l); l++) {
        CHECK(nth("qk", l)->i[1] == 1 && nth("qk", l)->i[2] == 1 && nth("qk", l)->p == nth("qk", 0)->p);
        CHECK(nth("attention", l)->i[1] == 0 && nth("attention", l)->f[1] == 0.0f &&
              nth("attention", l)->f[0] == 0.25f);
        CHECK(nth("glu", l)->i[1] == RL_K_ACT_SILU);
    }
}

/* what the ops refuse, by name */
static void refusals(void)
{
    rl_backend *be = NULL;
    CHECK(rl_backend_cuda_create_ex(0, RL_BF16, &be) == RL_OK);
    if (!be) return;
    void *a = NULL, *b = NULL;
    CHECK(be->alloc(be, &a, 4096) == RL_OK && be->alloc(be, &b, 4096) == RL_OK);
    int32_t cu[2] = {0, 4};
    rl_segments seg = {cu, cu, cu, 1, 4};
    CHECK(be->attention(be, &seg, a, b, 4, 2, 1, 16, 0.25f, 0, -1.0f) == RL_ERR_INVALID &&
          strstr(rl_last_error(), "softcap"));
    CHECK(be->attention(be, &seg, a, b, 4, 2, 1, 16, 0.25f, -2, 0.0f) == RL_ERR_INVALID &&
          strstr(rl_last_error(), "window"));
    CHECK(be->cast(be, a, RL_F32, b, RL_F16, 8) == RL_ERR_INVALID && strstr(rl_last_error(), "f16"));
    CHECK(be->cast(be, a, RL_F32, a, RL_BF16, 8) == RL_ERR_INVALID && strstr(rl_last_error(), "in place"));
    CHECK(be->rmsnorm(be, a, RL_F32, b, a, RL_BF16, 2, 16, 1e-6f, 0.0f, 1) == RL_ERR_INVALID &&
          strstr(rl_last_error(), "accumulating"));
    CHECK(be->glu(be, a, b, 2, 16, 7) == RL_ERR_INVALID && strstr(rl_last_error(), "activation 7"));
    CHECK(be->qk_norm_rope(be, &seg, a, 4, 2, 1, 16, NULL, NULL, RL_QK_NORM_PROJ, 0.0f, 1e-6f,
                           (const float *)b) == RL_ERR_INVALID && strstr(rl_last_error(), "q_norm"));
    be->free(be, a);
    be->free(be, b);
    be->destroy(be);
}

int main(void)
{
    gemma_like();
    olmo_like(RL_BF16);
    olmo_like(RL_F32);
    refusals();
    printf("failures %d\n", failures);
    return failures != 0;
}
"""


FAULT_C = r"""
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "engine.h"

typedef struct { char op[16]; int i[4]; float f[3]; const void *p; long long n; } mock_call;
extern mock_call mock_log[];
extern int mock_nlog, mock_fault_skip;
extern const char *mock_fault_op;
extern long mock_stream_syncs, mock_event_syncs;

static int failures;
#define CHECK(c) do { if (!(c)) { failures++; fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, #c, rl_last_error()); } } while (0)

static rl_model *load(int dev)
{
    rl_config c = {.vocab_size = 11, .hidden_size = 16, .intermediate_size = 32, .num_layers = 3,
                   .num_heads = 2, .num_kv_heads = 1, .head_dim = 16, .max_layer = 3,
                   .rms_norm_eps = 1e-6};
    rl_backend *be = NULL;
    CHECK(rl_backend_cuda_create_ex(dev, RL_BF16, &be) == RL_OK);
    rl_model *m = NULL;
    if (!be || rl_model_create(&c, be, &m) != RL_OK) return NULL;
    static float buf[64 * 64];
    for (int k = 0; k < RL_T_COUNT; k++)
        for (int64_t l = 0; l < (rl_tensor_kind_is_global((rl_tensor_kind)k) ? 1 : 3); l++) {
            int64_t s[2];
            int nd = rl_tensor_shape(&c, (rl_tensor_kind)k, s);
            if (nd) CHECK(rl_model_set_tensor(m, (rl_tensor_kind)k, l, buf, RL_F32, s, nd) == RL_OK);
        }
    CHECK(rl_model_reserve(m, 16) == RL_OK);
    return m;
}

static rl_status forward(rl_model *m)
{
    int32_t tok[5] = {1, 2, 3, 4, 5}, cu[3] = {0, 2, 5}, layers[2] = {1, 3}, spans[4] = {0, 2, 0, 3},
            seq[2] = {0, 1};
    rl_pool mean = RL_POOL_MEAN;
    rl_batch b = {tok, 5, cu, 2, layers, 2, spans, seq, 2, &mean, 1};
    rl_result res = {0};
    rl_status st = rl_model_forward(m, &b, &res);
    rl_result_free(&res);
    return st;
}

/* argv[1]: "async" (default ops) or "sync" (RJEPA_CUDA_SYNC=1). The second
 * attention launch (layer 1) faults on device 0. */
int main(int argc, char **argv)
{
    const int each = argc > 1 && strcmp(argv[1], "sync") == 0;
    if (each) setenv("RJEPA_CUDA_SYNC", "1", 1);
    rl_model *m = load(0), *m1 = load(1);
    if (!m || !m1) { printf("failures %d (setup)\n", failures + 1); return 1; }
    CHECK(forward(m) == RL_OK);                   /* a healthy device runs */
    mock_nlog = 0;
    mock_fault_op = "attention";
    mock_fault_skip = 1;
    CHECK(forward(m) == RL_ERR_CUDA);
    char first[1024];
    snprintf(first, sizeof first, "%s", rl_last_error());
    printf("message: %s\n", first);
    CHECK(strstr(first, "CUDA device fault on cuda:0: ") != NULL);
    CHECK(strstr(first, "restart the process") != NULL && strstr(first, "RJEPA_CUDA_SYNC=1") != NULL);
    /* with RJEPA_CUDA_SYNC=1 the op that faulted is named; without, the next launch
       (the O projection's GEMM) is the first to see it */
    CHECK(strstr(first, each ? "first seen by the attention call" : "first seen by the gemm call") != NULL);
    /* every later call on device 0 fails at once with the same message, launching nothing */
    int nlog = mock_nlog;
    long syncs = mock_stream_syncs + mock_event_syncs;
    CHECK(forward(m) == RL_ERR_CUDA && strcmp(rl_last_error(), first) == 0);
    CHECK(mock_nlog == nlog && mock_stream_syncs + mock_event_syncs == syncs);
    rl_backend *be = rl_model_backend(m);
    void *p = NULL;
    CHECK(be->alloc(be, &p, 64) == RL_ERR_CUDA && strcmp(rl_last_error(), first) == 0);
    size_t f = 0, t = 0;
    CHECK(rl_cuda_mem_info(0, &f, &t) == RL_ERR_CUDA && strcmp(rl_last_error(), first) == 0);
    CHECK(rl_cuda_check_device(0) == RL_ERR_CUDA && strcmp(rl_last_error(), first) == 0);
    rl_backend *again = NULL;
    CHECK(rl_backend_cuda_create_ex(0, RL_F32, &again) == RL_ERR_CUDA && again == NULL &&
          strcmp(rl_last_error(), first) == 0);
    /* another device is not touched by it */
    CHECK(forward(m1) == RL_OK);
    rl_model_free(m);                             /* teardown on a faulted device: no crash */
    rl_model_free(m1);
    printf("failures %d\n", failures);
    return failures != 0;
}
"""


SYNCS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "engine.h"

typedef struct { char op[16]; int i[4]; float f[3]; const void *p; long long n; } mock_call;
extern mock_call mock_log[];
extern int mock_nlog;
extern long mock_stream_syncs, mock_event_syncs, mock_d2h_copies;

static int failures;
#define CHECK(c) do { if (!(c)) { failures++; fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, #c, rl_last_error()); } } while (0)

#define D 16
#define CAP 16                                    /* max_tokens: 2 * 16 pooled rows */

static rl_model *load(rl_dtype dt)
{
    rl_config c = {.vocab_size = 11, .hidden_size = D, .intermediate_size = 32, .num_layers = 3,
                   .num_heads = 2, .num_kv_heads = 1, .head_dim = 16, .max_layer = 3,
                   .rms_norm_eps = 1e-6};
    rl_backend *be = NULL;
    CHECK(rl_backend_cuda_create_ex(0, dt, &be) == RL_OK);
    rl_model *m = NULL;
    if (!be || rl_model_create(&c, be, &m) != RL_OK) return NULL;
    static float buf[64 * 64];
    for (int k = 0; k < RL_T_COUNT; k++)
        for (int64_t l = 0; l < (rl_tensor_kind_is_global((rl_tensor_kind)k) ? 1 : 3); l++) {
            int64_t s[2];
            int nd = rl_tensor_shape(&c, (rl_tensor_kind)k, s);
            if (nd) CHECK(rl_model_set_tensor(m, (rl_tensor_kind)k, l, buf, RL_F32, s, nd) == RL_OK);
        }
    CHECK(rl_model_reserve(m, CAP) == RL_OK);
    return m;
}

/* One forward of 9 tokens in 2 sequences with S spans (span i: [i % 4, i % 4 + 1) of
 * sequence i % 2); returns the waits it made, checks every pooled row landed in its
 * result slot [q, p, s] (the mock's pool writes 100000 * hidden index + 10000 * mode +
 * absolute start) and counts its device -> host copies into *d2h. */
static long run(rl_model *m, const int32_t *layers, int nl, const rl_pool *pools, int np, int S,
                long *d2h)
{
    int32_t tok[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, cu[3] = {0, 4, 9};
    int32_t *spans = malloc(sizeof(int32_t) * 2 * (S + 1)), *seq = malloc(sizeof(int32_t) * (S + 1));
    for (int i = 0; i < S; i++) {
        seq[i] = i % 2;
        spans[2 * i] = i % 4;
        spans[2 * i + 1] = i % 4 + 1;
    }
    rl_batch b = {tok, 9, cu, 2, layers, nl, spans, seq, S, pools, np};
    rl_result res = {0};
    mock_nlog = 0;
    long before = mock_stream_syncs + mock_event_syncs, copies = mock_d2h_copies;
    CHECK(rl_model_forward(m, &b, &res) == RL_OK);
    long waits = mock_stream_syncs + mock_event_syncs - before;
    *d2h = mock_d2h_copies - copies;
    int bad = 0;
    for (int q = 0; q < np && res.data; q++)
        for (int p = 0; p < nl; p++)
            for (int s = 0; s < S; s++)
                for (int c = 0; c < D; c++) {
                    float want = (float)(100000 * layers[p] + 10000 * (int)pools[q] +
                                         cu[seq[s]] + spans[2 * s]);
                    bad += res.data[(((size_t)q * nl + p) * S + s) * D + c] != want;
                }
    CHECK(bad == 0);
    rl_result_free(&res);
    free(spans);
    free(seq);
    return waits;
}

int main(void)
{
    rl_dtype dts[2] = {RL_BF16, RL_F32};
    for (int i = 0; i < 2; i++) {
        rl_model *m = load(dts[i]);
        if (!m) { failures++; continue; }
        const int32_t two[2] = {1, 3}, dup[3] = {1, 1, 0}, three[3] = {0, 2, 3};
        const rl_pool mean_last[2] = {RL_POOL_MEAN, RL_POOL_LAST},
                      all[4] = {RL_POOL_MEAN, RL_POOL_FIRST, RL_POOL_LAST, RL_POOL_MAX};
        long d2h = 0;
        /* results that fit the pooled rows: one download, one wait, batch after batch */
        for (int rep = 0; rep < 3; rep++) {
            CHECK(run(m, two, 2, mean_last, 2, 5, &d2h) == 1 && d2h == 1);
            CHECK(run(m, dup, 3, all, 1, 9, &d2h) == 1 && d2h == 1);
            CHECK(run(m, two, 2, all, 4, 4, &d2h) == 1 && d2h == 1);    /* 32 rows: exactly full */
            CHECK(run(m, three, 1, mean_last, 2, CAP, &d2h) == 1 && d2h == 1); /* S = max_tokens */
        }
        CHECK(run(m, two, 2, all, 1, 0, &d2h) == 1 && d2h == 0);     /* no spans: nothing to fetch */
        /* larger results go through the rows as a ring: right slots, a wait per wrap */
        long w = run(m, three, 3, all, 4, 5, &d2h);                 /* 60 rows */
        CHECK(w >= 2 && w <= 1 + 60 / CAP);
        w = run(m, two, 2, mean_last, 2, 2 * CAP + 3, &d2h);        /* spans in chunks too */
        CHECK(w >= 2 && w <= 1 + 4 * (2 * CAP + 3) / CAP);
        rl_model_free(m);
    }
    printf("failures %d\n", failures);
    return failures != 0;
}
"""


@pytest.fixture(scope="module")
def cuda_inc() -> Path:
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h)")
    return inc


def _build(tmp_path: Path, cuda_inc: Path, soname: str, main_c: str) -> Path:
    """The mock as `soname`, and `main_c` linked with the engine and the real
    kernels/cuda_backend.c against it."""
    cc = os.environ.get("CC", "cc")
    (tmp_path / "mock.c").write_text(MOCK_C)
    (tmp_path / "main.c").write_text(main_c)
    inc = [f"-I{cuda_inc}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'kernels'}"]
    lib = tmp_path / soname
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-std=gnu11", "-DRL_WITH_CUDA", *inc,
                        str(tmp_path / "mock.c"), "-o", str(lib), f"-Wl,-soname,{soname}",
                        "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the core's C sources (not the Python binding, nor the stub the CUDA backend replaces)
    srcs = sorted(p for p in (ROOT / "csrc").glob("*.c")
                  if not p.name.startswith("binding") and p.name != "cuda_stub.c")
    srcs.append(ROOT / "kernels" / "cuda_backend.c")
    exe = tmp_path / "main"
    r = subprocess.run([cc, "-O1", "-std=c11", "-fopenmp", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-parameter", "-Wno-missing-field-initializers",
                        "-DRL_WITH_CUDA", "-DRL_BLAS_BUILTIN", *inc, *map(str, srcs),
                        str(tmp_path / "main.c"), "-o", str(exe), str(lib),
                        f"-Wl,-rpath,{tmp_path}", "-ldl", "-lpthread", "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


@pytest.mark.parametrize("soname", ["libcuda.so.1", "libmockcudart.so"])
def test_cuda_backend_host_logic_on_a_mock_runtime(tmp_path, cuda_inc, soname):
    exe = _build(tmp_path, cuda_inc, soname, MAIN_C)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == f"ctx_api {int(soname == 'libcuda.so.1')}"
    assert "failures 0" in r.stdout


def test_cuda_backend_runs_the_model_variants_with_their_parameters(tmp_path, cuda_inc):
    """Gemma-like and OLMo-2-like configs pass the CUDA capabilities and reach
    the kernels with their parameters: window on sliding layers only, their
    RoPE frequencies, soft-cap, scale, norm offset and the post-norm modes,
    GeGLU, the residual cast; bad op parameters are refused by name."""
    exe = _build(tmp_path, cuda_inc, "libcuda.so.1", WIRING_C)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failures 0" in r.stdout


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_device_fault_poisons_the_device_with_one_message(tmp_path, cuda_inc, mode):
    """A kernel fault (sticky: every later call on the device fails) is reported
    once, as a device fault, naming the op that first saw it and saying the
    process must be restarted; every later call on that device fails at once
    with the same message, launching and waiting for nothing; creating another
    backend there fails too; another device runs on. With RJEPA_CUDA_SYNC=1 each
    op waits for its work, so the faulting op (attention) is the one named."""
    exe = _build(tmp_path, cuda_inc, "libcuda.so.1", FAULT_C)
    r = subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failures 0" in r.stdout


def test_a_forward_downloads_its_pooled_rows_once_and_waits_once(tmp_path, cuda_inc):
    """Every (pooling, layer, span chunk) is pooled into the workspace's pooled
    rows in the result's layout and fetched with one asynchronous download and
    one wait per batch (counted on the mock: cudaStreamSynchronize plus
    cudaEventSynchronize, device-to-host copies), in bf16 and fp32 storage,
    for several poolings, repeated and unordered layers, a full buffer, no
    spans; results larger than the rows go through them as a ring and still
    land in the right slots. The mock's pool writes what made each row (hidden
    index, pooling, span start), so a misplaced row fails."""
    exe = _build(tmp_path, cuda_inc, "libcuda.so.1", SYNCS_C)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failures 0" in r.stdout
