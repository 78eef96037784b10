/* cuda_backend.c - the CUDA implementation of the rl_backend op table.
 *
 * Compiled as C with the engine sources when the build found nvcc
 * (RL_WITH_CUDA); csrc/cuda_stub.c provides failing stand-ins otherwise.
 *
 * Design choices:
 * - Storage: weights and GEMM operands bf16, residual stream and pooled
 *   rows f32, rope inv_freq f32. All accumulation in f32.
 * - fp32 mode (rl_backend_cuda_create_ex(.., RL_F32, ..)): weights and GEMM
 *   operands f32 as well, GEMMs as cublasGemmEx with f32 A/B/C, compute
 *   CUBLAS_COMPUTE_32F and CUBLAS_DEFAULT_MATH (no TF32: what torch does
 *   with allow_tf32 = False), attention on the f32 FMA kernel. It is the
 *   precision reference (parity with HF fp32 on the GPU), not the fast path.
 * - One non-blocking compute stream per backend; every copy and kernel is
 *   enqueued on it, so the op sequence of engine.c needs no other ordering.
 *   A forward enqueues its pooled rows' download (download_f32_async, into
 *   the pinned result) and waits once, in sync (an event recorded after the
 *   work, waited for): that is where asynchronous kernel faults usually
 *   surface. download_f32 (tests, one-off reads) waits by itself.
 * - Every CUDA runtime call and every launch is checked by CU_CHECK (the
 *   launchers return cudaGetLastError of the launch), every cuBLAS call by
 *   BLAS_CHECK; both record the expression, file and line. Nothing exits.
 * - A device fault (a sticky error: illegal address, trap, ECC...) breaks the
 *   device's context for the whole process. The first one seen poisons the
 *   device: its message says a device fault happened, which op first saw it
 *   and that the process must be restarted, and every later call on that
 *   device (ops, allocations, new backends) fails at once with it.
 *   RJEPA_CUDA_SYNC=1 (read at creation) makes every op that enqueues work
 *   wait for it and check it, so the op that faulted is the one named.
 * - Uploads convert on the host (OpenMP for large tensors) into one of two
 *   pinned staging buffers and DMA from there, alternating buffers so the
 *   conversion of a chunk overlaps the copy of the previous one. The source
 *   (often an mmap) is not needed after upload returns.
 * - GEMM: cublasGemmEx, bf16 A/B, f32 compute. Row-major y = x W^T is the
 *   column-major y^T = W x^T, so W is op T. accumulate=1 writes the f32
 *   residual with beta=1 (residual add fused); a bias is written into y
 *   first (bf16 out) or added to it (f32 out), then beta=1, so the sum is
 *   rounded once. The handle's math mode adds
 *   CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION: a split-K GEMM sums
 *   its partial results in f32, not in the bf16 output type.
 * - Attention runs on tensor cores (mma.sync) unless RJEPA_ATTN=fma is set
 *   when the backend is created (the f32 CUDA-core kernel; see
 *   cuda_kernels.cu).
 * - cuBLAS is dlopen()ed at creation (cublas_loader.c); its 32 MiB
 *   workspace is the only device memory outside weights and workspace
 *   (the Python layer's CUDA_HEADROOM_BYTES, rjepa_latent/model.py, covers
 *   it, the CUDA context and the handle's own allocations).
 * - The calling thread's current device is its own: every entry point (the
 *   op table and the rl_cuda_* functions) saves it, makes the backend's
 *   device current, and restores it before returning (dev_scope below), so
 *   engines on several GPUs share one process and torch's current device is
 *   never changed behind its back.
 * - Results live in pinned host blocks from one process-wide pool (size
 *   classes, a mutex, a byte cap on what it keeps cached): a forward takes a
 *   block instead of calling cudaHostAlloc, and host_release, which results
 *   call whenever they die (the model and backend may be long gone), puts it
 *   back or frees it when the pool is full. A result owns its block alone.
 */
#ifdef RL_WITH_CUDA
#define _GNU_SOURCE /* RTLD_NOLOAD, pthread */

#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cuda_internal.h"
#include "cuda_dequant.h"
#include "quant.h"

#define STAGE_BYTES ((size_t)32 << 20)       /* per pinned staging buffer  */
#define BLAS_WORKSPACE_BYTES ((size_t)32 << 20)

typedef struct {
    int device;
    char name[32];
    cudaStream_t stream;
    rl_cublas_api blas;
    rl_cublas_handle handle;
    void *blas_ws;
    void *stage[2];                 /* pinned host, STAGE_BYTES each, lazily */
    cudaEvent_t stage_done[2];      /* recorded after the DMA out of stage[i] */
    cudaEvent_t work_done;          /* recorded by sync: what it waits for */
    int stage_next;
    int attn_mma;                   /* tensor-core attention (RJEPA_ATTN != "fma") */
    int f32;                        /* fp32 mode: weights and act are f32 */
    int sync_each;                  /* RJEPA_CUDA_SYNC=1: every op waits and checks */
    char kernel[96];                /* "sm_90 132 SMs cuBLAS 130100 attention mma" (rl_backend.kernel) */
} cuda_impl;

static cuda_impl *impl_of(rl_backend *be) { return (cuda_impl *)be->impl; }

/* ---- error checking ---------------------------------------------------- */

/* A device fault (an illegal address in a kernel, a trap, an ECC error) is
 * sticky: the device's context is broken for the rest of the process and every
 * later CUDA call on it fails with the same error, whatever it is. It surfaces
 * at the first call that synchronises or launches after the faulting kernel,
 * which is usually a later op. So the first one seen poisons the device: its
 * message (which op saw it, what to do) is kept, and every later call on that
 * device fails at once with it instead of running. RJEPA_CUDA_SYNC=1 makes each
 * op wait for its own work, so the op that faulted is the one named. */
#define FAULT_DEVICES 64
static pthread_mutex_t fault_mu = PTHREAD_MUTEX_INITIALIZER;
static char fault_msg[FAULT_DEVICES][640];        /* "" until a fault is seen       */
static __thread const char *tl_op;                /* op-table entry running here    */
static __thread int tl_device = -1;               /* ... and its backend's device   */
static __thread int tl_sync_each;                 /* ... which waits for its work   */

static int sticky_error(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress: case cudaErrorLaunchFailure: case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction: case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace: case cudaErrorInvalidPc: case cudaErrorAssert:
    case cudaErrorLaunchTimeout: case cudaErrorECCUncorrectable:
        return 1;
    default:
        return 0;
    }
}

/* RL_OK, or the device's fault message when it is poisoned. */
static rl_status fault_check(int device)
{
    if (device < 0 || device >= FAULT_DEVICES) return RL_OK;
    char msg[sizeof fault_msg[0]];
    pthread_mutex_lock(&fault_mu);
    memcpy(msg, fault_msg[device], sizeof msg);
    pthread_mutex_unlock(&fault_mu);
    if (!msg[0]) return RL_OK;
    return RL_FAIL(RL_ERR_CUDA, "%s", msg);
}

static rl_status cu_fail(cudaError_t e, const char *expr, const char *file, int line)
{
    (void)cudaGetLastError(); /* clear a non-sticky error so later calls start clean */
    /* still there after clearing: sticky, whatever its code */
    const int sticky = sticky_error(e) || cudaGetLastError() != cudaSuccess;
    int dev = tl_device;
    if (sticky && dev < 0 && cudaGetDevice(&dev) != cudaSuccess) dev = -1;
    if (sticky && dev >= 0 && dev < FAULT_DEVICES) {
        pthread_mutex_lock(&fault_mu);
        if (!fault_msg[dev][0])
            snprintf(fault_msg[dev], sizeof fault_msg[dev], "CUDA device fault on cuda:%d: %s (%s), "
                     "first seen by the %s call (%.80s); the device's context is unusable for "
                     "the rest of this process and every later call on cuda:%d fails with this "
                     "message: restart the process. %s", dev, cudaGetErrorName(e),
                     cudaGetErrorString(e), tl_op ? tl_op : "device", expr, dev,
                     tl_sync_each ? "RJEPA_CUDA_SYNC=1 is set: every op waits for its own work, "
                                    "so the op named is the one that faulted"
                                  : "The op named is the first to see the fault, not necessarily "
                                    "the one that caused it: rerun with RJEPA_CUDA_SYNC=1 to "
                                    "check every op as it completes");
        pthread_mutex_unlock(&fault_mu);
        return fault_check(dev);
    }
    rl_status st = e == cudaErrorMemoryAllocation ? RL_ERR_DEVICE_MEMORY : RL_ERR_CUDA;
    return rl_error_set(st, file, line, "CUDA error in %s: %s (%s)", expr, cudaGetErrorName(e),
                        cudaGetErrorString(e));
}

#define CU_CHECK(expr)                                                   \
    do {                                                                 \
        cudaError_t cu_e_ = (expr);                                      \
        if (cu_e_ != cudaSuccess) return cu_fail(cu_e_, #expr, __FILE__, __LINE__); \
    } while (0)

static rl_status blas_fail(const cuda_impl *im, rl_cublas_status s, const char *expr,
                           const char *file, int line)
{
    /* cuBLAS fails too once the device has faulted: report the fault */
    cudaError_t e = cudaPeekAtLastError();
    if (e != cudaSuccess && sticky_error(e)) return cu_fail(e, expr, file, line);
    const char *msg = im->blas.status_string ? im->blas.status_string(s) : "";
    return rl_error_set(RL_ERR_BLAS, file, line, "cuBLAS error in %s: status %d %s", expr, (int)s,
                        msg ? msg : "");
}

#define BLAS_CHECK(im, expr)                                             \
    do {                                                                 \
        rl_cublas_status bl_s_ = (expr);                                 \
        if (bl_s_ != RL_CUBLAS_STATUS_SUCCESS) return blas_fail((im), bl_s_, #expr, __FILE__, __LINE__); \
    } while (0)

/* ---- devices ----------------------------------------------------------- */

int rl_cuda_compiled(void) { return 1; }

/* Number of visible devices, or 0 with the reason recorded (no driver...). */
static rl_status device_count(int *n)
{
    *n = 0;
    cudaError_t e = cudaGetDeviceCount(n);
    if (e == cudaSuccess) {
        if (*n == 0)
            return RL_FAIL(RL_ERR_DEVICE, "no CUDA device found: the NVIDIA driver sees none "
                           "(check CUDA_VISIBLE_DEVICES and nvidia-smi, or use device='cpu')");
        return RL_OK;
    }
    *n = 0;
    (void)cudaGetLastError();
    int drv = 0, rt = 0;
    (void)cudaDriverGetVersion(&drv);
    (void)cudaRuntimeGetVersion(&rt);
    if (e == cudaErrorNoDevice)
        return RL_FAIL(RL_ERR_DEVICE, "no CUDA device found: the NVIDIA driver sees none (check "
                       "CUDA_VISIBLE_DEVICES and nvidia-smi, or use device='cpu')");
    /* Without libcuda.so.1 cudart answers cudaErrorInsufficientDriver too, so
     * a driver version of 0 is what tells "no driver" from "too old". */
    if (drv == 0)
        return RL_FAIL(RL_ERR_DEVICE, "no NVIDIA driver found: no CUDA driver (libcuda.so.1) "
                       "could be loaded; install the NVIDIA driver to use a GPU, or use "
                       "device='cpu'");
    if (e == cudaErrorInsufficientDriver)
        return RL_FAIL(RL_ERR_DEVICE, "the NVIDIA driver is too old: it supports CUDA %d.%d, this "
                       "build needs %d.%d (update the NVIDIA driver, or use device='cpu')",
                       drv / 1000, (drv % 1000) / 10, rt / 1000, (rt % 1000) / 10);
    return RL_FAIL(RL_ERR_DEVICE, "CUDA initialisation failed: %s: %s (check the NVIDIA driver "
                   "with nvidia-smi, or use device='cpu')", cudaGetErrorName(e),
                   cudaGetErrorString(e));
}

int rl_cuda_device_count(void)
{
    int n = 0;
    return device_count(&n) == RL_OK ? n : 0;
}

/* RL_OK if `index` names a usable device (driver, index, compute capability). */
static rl_status check_device(int index)
{
    RL_TRY(fault_check(index));
    int n = 0;
    RL_TRY(device_count(&n));
    if (index < 0 || index >= n)
        return RL_FAIL(RL_ERR_DEVICE, "CUDA device index %d out of range (%d device%s visible)",
                       index, n, n == 1 ? "" : "s");
    int major = 0, minor = 0;
    CU_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
    CU_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
    if (major < 8)
        return RL_FAIL(RL_ERR_DEVICE, "CUDA device %d has compute capability %d.%d; bf16 tensor "
                       "cores need 8.0 or newer", index, major, minor);
    return RL_OK;
}

rl_status rl_cuda_check_device(int device_index) { return check_device(device_index); }

/* ---- the calling thread's current device -------------------------------- */

/* The driver's context calls, taken from the libcuda that cudart has loaded
 * (never linked: the extension imports without a driver). With them the
 * thread's context is restored exactly, "none" included; without them the
 * device is restored with cudaSetDevice. CUresult 0 is CUDA_SUCCESS. */
typedef int (*cu_ctx_get_fn)(void **ctx);
typedef int (*cu_ctx_set_fn)(void *ctx);
typedef int (*cu_device_get_fn)(int *dev, int ordinal);
typedef int (*cu_primary_state_fn)(int dev, unsigned *flags, int *active);
static pthread_once_t ctx_api_once = PTHREAD_ONCE_INIT;
static cu_ctx_get_fn cu_ctx_get;
static cu_ctx_set_fn cu_ctx_set;
static cu_device_get_fn cu_device_get;
static cu_primary_state_fn cu_primary_state;

static void resolve_ctx_api(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);   /* loaded by cudart or not at all */
    if (!h) return;
    void *g = dlsym(h, "cuCtxGetCurrent"), *st = dlsym(h, "cuCtxSetCurrent");
    void *dg = dlsym(h, "cuDeviceGet"), *ps = dlsym(h, "cuDevicePrimaryCtxGetState");
    if (!g || !st || !dg || !ps) return;
    *(void **)&cu_ctx_get = g;
    *(void **)&cu_ctx_set = st;
    *(void **)&cu_device_get = dg;
    *(void **)&cu_primary_state = ps;
}

typedef struct {
    int prev;          /* cudaGetDevice of the caller                         */
    void *prev_ctx;    /* the caller's current context (NULL: none)           */
    int have_ctx;      /* prev_ctx is known (driver calls resolved)           */
    int changed;       /* entering changed the thread's device or context     */
} dev_scope;

/* Makes `device` current on the calling thread, remembering what was. Always
 * called after a device check (so cudart has loaded libcuda). */
static rl_status scope_enter(dev_scope *sc, int device)
{
    memset(sc, 0, sizeof *sc);
    CU_CHECK(cudaGetDevice(&sc->prev));
    (void)pthread_once(&ctx_api_once, resolve_ctx_api);
    sc->have_ctx = cu_ctx_get && cu_ctx_get(&sc->prev_ctx) == 0;
    /* also when it is current already: cheap, and it makes the device's
     * primary context (the one our stream and handle belong to) current */
    CU_CHECK(cudaSetDevice(device));
    if (sc->have_ctx) {
        void *now = NULL;
        sc->changed = cu_ctx_get(&now) != 0 || now != sc->prev_ctx;
    } else {
        sc->changed = sc->prev != device;
    }
    return RL_OK;
}

/* Gives the thread back the context it had before scope_enter, exactly (a
 * thread that had none gets none back), and the device cudaGetDevice
 * reported. Restoring never creates a context: for a thread that had none,
 * the reported device is set again (cudaSetDevice, then no context) only if
 * that device's primary context is live already; otherwise the runtime may
 * go on reporting the last device set on this thread (torch's MaybeSetDevice
 * makes the same choice). */
static void scope_leave(const dev_scope *sc)
{
    if (!sc->changed) return;
    if (!sc->have_ctx) {
        (void)cudaSetDevice(sc->prev);
    } else if (sc->prev_ctx) {
        (void)cu_ctx_set(sc->prev_ctx);
    } else {
        int dev = 0, active = 0;
        unsigned flags = 0;
        if (cu_device_get(&dev, sc->prev) == 0 && cu_primary_state(dev, &flags, &active) == 0 &&
            active)
            (void)cudaSetDevice(sc->prev);
        (void)cu_ctx_set(NULL);
    }
    (void)cudaGetLastError(); /* a failed restore must not surface in a later call */
}

/* `return call` with `device` current for its duration, as the op `name`
 * (what a device fault seen inside is reported under); a device that has
 * faulted fails at once. sync_each: then wait for the stream and check it, so
 * a fault of this op's kernels is seen, and named, here (RJEPA_CUDA_SYNC=1). */
static rl_status op_sync_checked(rl_backend *be);
#define ON_DEVICE_AS(device, name, sync_each, be, call)                  \
    do {                                                                 \
        const char *prev_op_ = tl_op;                                    \
        const int prev_dev_ = tl_device, prev_sync_ = tl_sync_each;      \
        RL_TRY(fault_check(device));                                     \
        tl_op = (name);                                                  \
        tl_device = (device);                                            \
        tl_sync_each = (sync_each);                                      \
        dev_scope sc_;                                                   \
        rl_status on_st_ = scope_enter(&sc_, (device));                  \
        if (on_st_ == RL_OK) {                                           \
            on_st_ = (call);                                             \
            if (on_st_ == RL_OK && (sync_each)) on_st_ = op_sync_checked(be); \
            scope_leave(&sc_);                                           \
        }                                                                \
        tl_op = prev_op_;                                                \
        tl_device = prev_dev_;                                           \
        tl_sync_each = prev_sync_;                                       \
        return on_st_;                                                   \
    } while (0)

#define ON_DEVICE(device, name, call) ON_DEVICE_AS(device, name, 0, NULL, call)
/* an entry that allocates or asks */
#define ON_BACKEND(be, name, call) ON_DEVICE_AS(impl_of(be)->device, name, 0, be, call)
/* an entry that enqueues device work */
#define ON_OP(be, name, call) ON_DEVICE_AS(impl_of(be)->device, name, impl_of(be)->sync_each, be, call)

static rl_status mem_info_in(size_t *free_bytes, size_t *total_bytes)
{
    CU_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    return RL_OK;
}

rl_status rl_cuda_mem_info(int device_index, size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = *total_bytes = 0;
    RL_TRY(check_device(device_index));
    ON_DEVICE(device_index, "mem_info", mem_info_in(free_bytes, total_bytes));
}

/* ---- memory ------------------------------------------------------------ */

static rl_status alloc_in(rl_backend *be, void **ptr, size_t bytes)
{
    if (bytes == 0) return RL_OK;
    cudaError_t e = cudaMalloc(ptr, bytes);
    if (e != cudaSuccess) {
        *ptr = NULL;
        (void)cudaGetLastError();
        size_t fr = 0, tot = 0;
        (void)cudaMemGetInfo(&fr, &tot);
        rl_status st = e == cudaErrorMemoryAllocation ? RL_ERR_DEVICE_MEMORY : RL_ERR_CUDA;
        return RL_FAIL(st, "cudaMalloc of %.3f GiB on %s failed: %s (%.3f GiB free of %.3f GiB)",
                       bytes / 1073741824.0, be->name, cudaGetErrorString(e), fr / 1073741824.0,
                       tot / 1073741824.0);
    }
    return RL_OK;
}

static rl_status cuda_alloc(rl_backend *be, void **ptr, size_t bytes)
{
    *ptr = NULL;
    ON_BACKEND(be, "alloc", alloc_in(be, ptr, bytes));
}

static rl_status free_in(void *ptr)
{
    (void)cudaFree(ptr);
    (void)cudaGetLastError();
    return RL_OK;
}

static void cuda_free(rl_backend *be, void *ptr)
{
    if (!ptr) return;
    dev_scope sc;
    if (scope_enter(&sc, impl_of(be)->device) != RL_OK) return;
    (void)free_in(ptr);
    scope_leave(&sc);
}

/* ---- the pinned host pool (results) --------------------------------------- */

/* Each block starts with a header (POOL_HDR bytes, so the data keeps 64-byte
 * alignment) saying its size class and the device it was allocated from.
 * Classes are 2^e * {4, 5, 6, 7} / 4 bytes from 4 KiB up: a block is at most
 * 25 % larger than asked for (header included). Blocks are cudaHostAllocPortable, so a block freed by one
 * device's engine serves another's. */
#define POOL_HDR 64
#define POOL_MAGIC 0x726c706bu            /* "rlpk": held by a result */
#define POOL_CACHED 0x726c6663u           /* "rlfc": in a free list (a second release is ignored) */
#define POOL_MIN_SHIFT 12
#define POOL_CLASSES (4 * (62 - POOL_MIN_SHIFT))
#define POOL_DEFAULT_CAP ((size_t)512 << 20)

typedef struct pool_block {
    uint32_t magic;
    int32_t cls;
    int device;
    struct pool_block *next;              /* free list link while cached */
} pool_block;

_Static_assert(sizeof(pool_block) <= POOL_HDR, "the pool header must fit before the data");

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pool_block *pool_free_list[POOL_CLASSES];
static size_t pool_cap = (size_t)-1;      /* read from RJEPA_PINNED_POOL_MB at first use */
static size_t pool_cached, pool_live;
static uint64_t pool_reused, pool_allocated, pool_freed;

static size_t class_bytes(int c)
{
    return ((size_t)1 << (POOL_MIN_SHIFT + c / 4 - 2)) * (size_t)(4 + c % 4);
}

/* Smallest class holding n bytes, or -1 when none does. */
static int class_of(size_t n)
{
    if (n <= ((size_t)1 << POOL_MIN_SHIFT)) return 0;
    int e = 63 - __builtin_clzll((unsigned long long)n);
    size_t base = (size_t)1 << e;
    size_t q = ((n - base) * 4 + base - 1) / base;   /* quarters above 2^e, rounded up */
    if (q == 4) { e++; q = 0; }
    int c = (e - POOL_MIN_SHIFT) * 4 + (int)q;
    return c < POOL_CLASSES ? c : -1;
}

/* Under pool_mu. */
static void pool_read_cap(void)
{
    if (pool_cap != (size_t)-1) return;
    pool_cap = POOL_DEFAULT_CAP;
    const char *env = getenv("RJEPA_PINNED_POOL_MB");
    if (env && *env) {
        char *end = NULL;
        unsigned long long mb = strtoull(env, &end, 10);
        if (end && *end == '\0' && mb < ((unsigned long long)1 << 40)) pool_cap = (size_t)mb << 20;
    }
}

static rl_status host_alloc_in(void **base, size_t bytes)
{
    cudaError_t e = cudaHostAlloc(base, bytes, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        *base = NULL;
        (void)cudaGetLastError();
        return RL_FAIL(RL_ERR_NOMEM, "cudaHostAlloc of %zu bytes (pinned) failed: %s", bytes,
                       cudaGetErrorString(e));
    }
    return RL_OK;
}

static rl_status host_free_in(void *base)
{
    (void)cudaFreeHost(base);
    (void)cudaGetLastError();
    return RL_OK;
}

/* Frees every cached block (the caller holds no lock). */
static void pool_drain(void)
{
    pthread_mutex_lock(&pool_mu);
    pool_block *all = NULL;
    for (int c = 0; c < POOL_CLASSES; c++) {
        while (pool_free_list[c]) {
            pool_block *b = pool_free_list[c];
            pool_free_list[c] = b->next;
            pool_cached -= class_bytes(c);
            b->next = all;
            all = b;
            pool_freed++;
        }
    }
    pthread_mutex_unlock(&pool_mu);
    while (all) {
        pool_block *b = all;
        all = b->next;
        dev_scope sc;
        if (scope_enter(&sc, b->device) == RL_OK) {
            (void)host_free_in(b);
            scope_leave(&sc);
        }
    }
}

static rl_status cuda_host_alloc(rl_backend *be, void **ptr, size_t bytes)
{
    *ptr = NULL;
    const int device = impl_of(be)->device;
    int c = bytes > SIZE_MAX - POOL_HDR ? -1 : class_of(bytes + POOL_HDR);
    if (c < 0) return RL_FAIL(RL_ERR_NOMEM, "a result of %zu bytes is too large", bytes);
    const size_t sz = class_bytes(c);
    pthread_mutex_lock(&pool_mu);
    pool_read_cap();
    pool_block *b = pool_free_list[c];
    if (b) {
        pool_free_list[c] = b->next;
        pool_cached -= sz;
        pool_live += sz;
        pool_reused++;
    }
    pthread_mutex_unlock(&pool_mu);
    if (!b) {
        void *base = NULL;
        dev_scope sc;
        RL_TRY(scope_enter(&sc, device));
        rl_status st = host_alloc_in(&base, sz);
        scope_leave(&sc);
        if (st != RL_OK) {      /* cached blocks of other sizes may be what is missing */
            pool_drain();
            RL_TRY(scope_enter(&sc, device));
            st = host_alloc_in(&base, sz);
            scope_leave(&sc);
            if (st != RL_OK) return st;
        }
        b = base;
        pthread_mutex_lock(&pool_mu);
        pool_live += sz;
        pool_allocated++;
        pthread_mutex_unlock(&pool_mu);
        b->device = device;
    }
    b->magic = POOL_MAGIC;
    b->cls = c;
    b->next = NULL;
    *ptr = (char *)b + POOL_HDR;
    return RL_OK;
}

/* Needs no backend state (results outlive the backend): the block goes back
 * to the pool, or is freed on the device it came from when the pool holds
 * its cap already. */
static void cuda_host_release(void *ptr)
{
    if (!ptr) return;
    pool_block *b = (pool_block *)((char *)ptr - POOL_HDR);
    pthread_mutex_lock(&pool_mu);
    /* not a block a result holds (released already, or not ours): ignored */
    if (b->magic != POOL_MAGIC || b->cls < 0 || b->cls >= POOL_CLASSES) {
        pthread_mutex_unlock(&pool_mu);
        return;
    }
    const size_t sz = class_bytes(b->cls);
    pool_read_cap();
    pool_live -= sz;
    int keep = pool_cached + sz <= pool_cap;
    if (keep) {
        b->magic = POOL_CACHED;
        b->next = pool_free_list[b->cls];
        pool_free_list[b->cls] = b;
        pool_cached += sz;
    } else {
        b->magic = 0;
        pool_freed++;
    }
    pthread_mutex_unlock(&pool_mu);
    if (keep) return;
    dev_scope sc;
    if (scope_enter(&sc, b->device) != RL_OK) return;
    (void)host_free_in(b);
    scope_leave(&sc);
}

void rl_cuda_pinned_pool_stats(rl_pinned_pool_stats *out)
{
    pthread_mutex_lock(&pool_mu);
    pool_read_cap();
    out->cap_bytes = pool_cap;
    out->cached_bytes = pool_cached;
    out->live_bytes = pool_live;
    out->reused = pool_reused;
    out->allocated = pool_allocated;
    out->freed = pool_freed;
    pthread_mutex_unlock(&pool_mu);
}

void rl_cuda_pinned_pool_trim(void) { pool_drain(); }

/* ---- uploads ----------------------------------------------------------- */

static rl_status ensure_staging(cuda_impl *im)
{
    for (int i = 0; i < 2; i++) {
        if (im->stage[i]) continue;
        cudaError_t e = cudaHostAlloc(&im->stage[i], STAGE_BYTES, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            im->stage[i] = NULL;
            (void)cudaGetLastError();
            return RL_FAIL(RL_ERR_NOMEM, "cudaHostAlloc of the %zu MiB upload staging buffer "
                           "failed: %s", STAGE_BYTES >> 20, cudaGetErrorString(e));
        }
    }
    return RL_OK;
}

/* dst[0..n) (dst_dtype: bf16 or f32) = src[0..n) (any rl_dtype), on the host. */
static void convert_chunk(void *dst, rl_dtype dst_dtype, const void *src, rl_dtype src_dtype,
                          size_t n)
{
    const long long nn = (long long)n;
    const int par = n >= ((size_t)1 << 18);
    if (dst_dtype == src_dtype) {
        /* a parallel copy: reading a cold mmap is page-fault bound */
        const size_t es = rl_dtype_size(dst_dtype), blk = (size_t)1 << 20;
        const long long nblk = (long long)((n * es + blk - 1) / blk);
        #pragma omp parallel for if (par) schedule(static)
        for (long long b = 0; b < nblk; b++) {
            size_t off = (size_t)b * blk, len = n * es - off < blk ? n * es - off : blk;
            memcpy((char *)dst + off, (const char *)src + off, len);
        }
        return;
    }
    if (dst_dtype == RL_F32) {
        rl_convert_to_f32(dst, src, src_dtype, n);
        return;
    }
    uint16_t *d = dst; /* bf16 destination */
    if (src_dtype == RL_F32) {
        const float *s = src;
        #pragma omp parallel for if (par) schedule(static)
        for (long long i = 0; i < nn; i++) d[i] = rl_f32_to_bf16(s[i]);
    } else { /* f16 -> f32 (exact) -> bf16 */
        const uint16_t *s = src;
        #pragma omp parallel for if (par) schedule(static)
        for (long long i = 0; i < nn; i++) d[i] = rl_f32_to_bf16(rl_f16_to_f32(s[i]));
    }
}

static rl_status upload_in(rl_backend *be, void *dst, rl_dtype dst_dtype,
                             size_t dst_offset_elems, const void *src_host, rl_dtype src_dtype,
                             size_t n)
{
    cuda_impl *im = impl_of(be);
    if (dst_dtype != RL_BF16 && dst_dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "CUDA upload: destination dtype %s is not stored on the "
                       "device (bf16 or f32 only)", rl_dtype_name(dst_dtype));
    if (n == 0) return RL_OK;
    RL_TRY(ensure_staging(im));
    const size_t des = rl_dtype_size(dst_dtype), ses = rl_dtype_size(src_dtype);
    const size_t chunk = STAGE_BYTES / des;
    char *d = (char *)dst + dst_offset_elems * des;
    const char *s = src_host;
    for (size_t i = 0; i < n; i += chunk) {
        size_t m = n - i < chunk ? n - i : chunk;
        int b = im->stage_next;
        im->stage_next ^= 1;
        CU_CHECK(cudaEventSynchronize(im->stage_done[b])); /* its last DMA is done */
        convert_chunk(im->stage[b], dst_dtype, s + i * ses, src_dtype, m);
        CU_CHECK(cudaMemcpyAsync(d + i * des, im->stage[b], m * des, cudaMemcpyHostToDevice,
                                 im->stream));
        CU_CHECK(cudaEventRecord(im->stage_done[b], im->stream));
    }
    return RL_OK;
}

/* Small per-batch arrays (tokens, offsets, spans). A pageable source is
 * staged by the driver before cudaMemcpyAsync returns, so the caller may
 * reuse it at once. */
static rl_status upload_i32_in(rl_backend *be, int32_t *dst, const int32_t *src_host, size_t n)
{
    if (n == 0) return RL_OK;
    CU_CHECK(cudaMemcpyAsync(dst, src_host, n * sizeof(int32_t), cudaMemcpyHostToDevice,
                             impl_of(be)->stream));
    return RL_OK;
}

static rl_status download_f32_in(rl_backend *be, float *dst_host, const float *src, size_t n)
{
    cuda_impl *im = impl_of(be);
    if (n) CU_CHECK(cudaMemcpyAsync(dst_host, src, n * sizeof(float), cudaMemcpyDeviceToHost,
                                    im->stream));
    CU_CHECK(cudaStreamSynchronize(im->stream));
    return RL_OK;
}

/* Enqueued only: the engine downloads a forward's pooled rows this way and
 * waits once, in sync. Into pinned memory (results are) the copy is truly
 * asynchronous. */
static rl_status download_f32_async_in(rl_backend *be, float *dst_host, const float *src, size_t n)
{
    if (n) CU_CHECK(cudaMemcpyAsync(dst_host, src, n * sizeof(float), cudaMemcpyDeviceToHost,
                                    impl_of(be)->stream));
    return RL_OK;
}

/* Everything enqueued so far, done: an event after it, waited for. */
static rl_status sync_in(rl_backend *be)
{
    cuda_impl *im = impl_of(be);
    CU_CHECK(cudaEventRecord(im->work_done, im->stream));
    CU_CHECK(cudaEventSynchronize(im->work_done));
    return RL_OK;
}

/* RJEPA_CUDA_SYNC=1: after each op, its work done and checked */
static rl_status op_sync_checked(rl_backend *be)
{
    CU_CHECK(cudaStreamSynchronize(impl_of(be)->stream));
    CU_CHECK(cudaGetLastError());
    return RL_OK;
}

static rl_status mem_info_be_in(rl_backend *be, size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = *total_bytes = 0;
    CU_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    return RL_OK;
}

static int cuda_is_resident(rl_backend *be, const void *ptr)
{
    if (!ptr) return 0;
    struct cudaPointerAttributes a;
    memset(&a, 0, sizeof a);
    dev_scope sc;
    if (scope_enter(&sc, impl_of(be)->device) != RL_OK) return 0;
    cudaError_t e = cudaPointerGetAttributes(&a, ptr);
    scope_leave(&sc);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return a.type == cudaMemoryTypeDevice && a.device == impl_of(be)->device;
}

/* ---- ops --------------------------------------------------------------- */

static int stored_dtype(rl_dtype dt) { return dt == RL_BF16 || dt == RL_F32; }

static rl_status embed_in(rl_backend *be, const int32_t *tokens, int64_t T, const void *table,
                            int64_t d, void *x, float scale)
{
    if (!isfinite(scale))
        return RL_FAIL(RL_ERR_INVALID, "CUDA embed: scale %g is not finite", (double)scale);
    if (T == 0) return RL_OK;
    CU_CHECK(rl_k_embed(impl_of(be)->stream, tokens, T, table, impl_of(be)->f32, d, scale, x));
    return RL_OK;
}

static rl_status rmsnorm_in(rl_backend *be, const void *x, rl_dtype x_dtype, const void *w,
                              void *y, rl_dtype out_dtype, int64_t rows, int64_t d, float eps,
                              float w_offset, int accumulate)
{
    if (!stored_dtype(x_dtype) || !stored_dtype(out_dtype))
        return RL_FAIL(RL_ERR_INVALID, "CUDA rmsnorm: input %s / output %s unsupported (bf16 or "
                       "f32 only)", rl_dtype_name(x_dtype), rl_dtype_name(out_dtype));
    if (accumulate && out_dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "CUDA rmsnorm: accumulating needs the f32 residual as "
                       "output, got %s", rl_dtype_name(out_dtype));
    if (!isfinite(w_offset))
        return RL_FAIL(RL_ERR_INVALID, "CUDA rmsnorm: weight offset %g is not finite",
                       (double)w_offset);
    if (rows == 0) return RL_OK;
    const int out = accumulate ? RL_K_NORM_ADD_F32 : out_dtype == RL_F32 ? RL_K_NORM_F32
                                                                         : RL_K_NORM_BF16;
    CU_CHECK(rl_k_rmsnorm(impl_of(be)->stream, x, x_dtype == RL_F32, w, impl_of(be)->f32,
                          w_offset, y, out, rows, d, eps));
    return RL_OK;
}

static rl_status gemm_in(rl_backend *be, const rl_segments *seg, const void *x, const void *w,
                           const void *bias, void *y, int64_t M, int64_t N, int64_t K,
                           int accumulate)
{
    (void)seg; /* one GEMM over the packed batch: rows are independent */
    cuda_impl *im = impl_of(be);
    if (M == 0 || N == 0) return RL_OK;
    if (M > INT_MAX || N > INT_MAX || K > INT_MAX || K <= 0)
        return RL_FAIL(RL_ERR_INVALID, "CUDA gemm: sizes M=%lld N=%lld K=%lld out of range",
                       (long long)M, (long long)N, (long long)K);
    const float alpha = 1.0f;
    float beta = accumulate ? 1.0f : 0.0f;
    /* y is f32 when accumulating into the residual and always in fp32 mode */
    const int y_f32 = accumulate || im->f32;
    if (bias) {
        CU_CHECK(rl_k_bias_rows(im->stream, y, y_f32, bias, im->f32, M, N, accumulate));
        beta = 1.0f;
    }
    /* fp32 mode: f32 A/B/C, COMPUTE_32F under the handle's DEFAULT_MATH = no TF32 */
    const int abtype = im->f32 ? RL_CUDA_R_32F : RL_CUDA_R_16BF;
    const int ctype = y_f32 ? RL_CUDA_R_32F : RL_CUDA_R_16BF;
    BLAS_CHECK(im, im->blas.gemm_ex(im->handle, RL_CUBLAS_OP_T, RL_CUBLAS_OP_N, (int)N, (int)M,
                                    (int)K, &alpha, w, abtype, (int)K, x, abtype, (int)K, &beta, y,
                                    ctype, (int)N, RL_CUBLAS_COMPUTE_32F, RL_CUBLAS_GEMM_DEFAULT));
    return RL_OK;
}

static rl_status qk_norm_rope_in(rl_backend *be, const rl_segments *seg, void *qkv, int64_t T,
                                   int64_t nh, int64_t nkv, int64_t hd, const void *q_norm,
                                   const void *k_norm, int norm_mode, float w_offset, float eps,
                                   const float *inv_freq)
{
    if (norm_mode != RL_QK_NORM_NONE && norm_mode != RL_QK_NORM_HEAD &&
        norm_mode != RL_QK_NORM_PROJ)
        return RL_FAIL(RL_ERR_INVALID, "CUDA qk_norm_rope: unknown norm_mode %d (0: none, 1: per "
                       "head, 2: whole projection)", norm_mode);
    if (norm_mode == RL_QK_NORM_NONE) q_norm = k_norm = NULL;
    else if (!q_norm || !k_norm)
        return RL_FAIL(RL_ERR_INVALID, "CUDA qk_norm_rope: norm_mode %d needs q_norm and k_norm",
                       norm_mode);
    if (!isfinite(w_offset))
        return RL_FAIL(RL_ERR_INVALID, "CUDA qk_norm_rope: weight offset %g is not finite",
                       (double)w_offset);
    if (T == 0) return RL_OK;
    CU_CHECK(rl_k_qk_norm_rope(impl_of(be)->stream, qkv, impl_of(be)->f32, T, nh, nkv, hd,
                               q_norm, k_norm, norm_mode == RL_QK_NORM_PROJ, w_offset, eps,
                               inv_freq, seg->positions_dev));
    return RL_OK;
}

static rl_status attention_in(rl_backend *be, const rl_segments *seg, const void *qkv,
                                void *out, int64_t T, int64_t nh, int64_t nkv, int64_t hd,
                                float scale, int64_t window, float softcap)
{
    if (window < 0 || !(softcap >= 0.0f) || isinf(softcap))
        return RL_FAIL(RL_ERR_INVALID, "CUDA attention: window (%lld) and softcap (%g) must be "
                       ">= 0 and finite (0: none)", (long long)window, (double)softcap);
    if (T == 0) return RL_OK;
    if (!rl_k_attention_supports(hd))
        return RL_FAIL(RL_ERR_INVALID, "CUDA attention: head_dim %lld is not supported (16, 32, "
                       "64, 80, 96, 128, 256 are)", (long long)hd);
    CU_CHECK(rl_k_attention(impl_of(be)->stream, qkv, out, impl_of(be)->f32, seg->cu_seqlens_dev,
                            seg->n_seqs, seg->max_seqlen, nh, nkv, hd, scale, softcap, window,
                            impl_of(be)->attn_mma));
    return RL_OK;
}

static rl_status glu_in(rl_backend *be, const void *gu, void *out, int64_t T, int64_t ff, int act)
{
    if (act != RL_ACT_SILU && act != RL_ACT_GELU_TANH)
        return RL_FAIL(RL_ERR_INVALID, "CUDA glu: unknown activation %d (0: silu, 1: gelu_tanh)",
                       act);
    if (T == 0) return RL_OK;
    CU_CHECK(rl_k_glu(impl_of(be)->stream, gu, out, impl_of(be)->f32, T, ff,
                      act == RL_ACT_GELU_TANH ? RL_K_ACT_GELU_TANH : RL_K_ACT_SILU));
    return RL_OK;
}

static rl_status cast_in(rl_backend *be, const void *src, rl_dtype src_dtype, void *dst,
                         rl_dtype dst_dtype, int64_t n)
{
    if (!stored_dtype(src_dtype) || !stored_dtype(dst_dtype))
        return RL_FAIL(RL_ERR_INVALID, "CUDA cast: %s -> %s unsupported (bf16 and f32 only)",
                       rl_dtype_name(src_dtype), rl_dtype_name(dst_dtype));
    /* elements of different sizes would overlap other threads' elements */
    if (src == dst && src_dtype != dst_dtype)
        return RL_FAIL(RL_ERR_INVALID, "CUDA cast: %s -> %s cannot be done in place",
                       rl_dtype_name(src_dtype), rl_dtype_name(dst_dtype));
    if (n < 0) return RL_FAIL(RL_ERR_INVALID, "CUDA cast: n=%lld is negative", (long long)n);
    if (n == 0 || (src == dst && src_dtype == dst_dtype)) return RL_OK;
    CU_CHECK(rl_k_cast(impl_of(be)->stream, src, src_dtype == RL_F32, dst, dst_dtype == RL_F32, n));
    return RL_OK;
}

static rl_status pool_in(rl_backend *be, const void *x, rl_dtype src_dtype, int64_t d,
                           const int32_t *spans_abs, int64_t S, rl_pool mode, float *out)
{
    if (src_dtype != RL_BF16 && src_dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "CUDA pool: source dtype %s unsupported",
                       rl_dtype_name(src_dtype));
    if ((unsigned)mode >= RL_POOL_COUNT)
        return RL_FAIL(RL_ERR_INVALID, "CUDA pool: unknown pooling %d", (int)mode);
    if (S == 0) return RL_OK;
    CU_CHECK(rl_k_pool(impl_of(be)->stream, x, src_dtype == RL_F32, d, spans_abs, S, (int)mode,
                       out));
    return RL_OK;
}

/* ---- the op table: each entry with the backend's device current -------- */

static rl_status cuda_upload(rl_backend *be, void *dst, rl_dtype dst_dtype, size_t dst_offset_elems,
                             const void *src_host, rl_dtype src_dtype, size_t n)
{
    ON_OP(be, "upload", upload_in(be, dst, dst_dtype, dst_offset_elems, src_host, src_dtype, n));
}

static rl_status cuda_upload_i32(rl_backend *be, int32_t *dst, const int32_t *src_host, size_t n)
{
    ON_OP(be, "upload_i32", upload_i32_in(be, dst, src_host, n));
}

static rl_status cuda_download_f32(rl_backend *be, float *dst_host, const float *src, size_t n)
{
    ON_OP(be, "download_f32", download_f32_in(be, dst_host, src, n));
}

static rl_status cuda_download_f32_async(rl_backend *be, float *dst_host, const float *src,
                                        size_t n)
{
    ON_OP(be, "download_f32_async", download_f32_async_in(be, dst_host, src, n));
}

static rl_status cuda_sync(rl_backend *be) { ON_BACKEND(be, "sync", sync_in(be)); }

static rl_status cuda_mem_info_be(rl_backend *be, size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = *total_bytes = 0;
    ON_BACKEND(be, "mem_info", mem_info_be_in(be, free_bytes, total_bytes));
}

static rl_status cuda_embed(rl_backend *be, const int32_t *tokens, int64_t T, const void *table,
                            int64_t d, void *x, float scale)
{
    ON_OP(be, "embed", embed_in(be, tokens, T, table, d, x, scale));
}

/* weights kept quantized (csrc/qweights.c): GGUF blocks, or the AWQ / GPTQ /
 * FP8 parts (validated on the host when they were set), in device memory */
static int dequant_is_hf(const rl_qtensor *q) { return q->family != RL_QF_GGUF; }

static rl_status dequant_check(const rl_qtensor *q)
{
    if (dequant_is_hf(q) ? !rl_k_dequant_hf_supports(q)
                         : !rl_k_dequant_supports(q->subtype))
        return RL_FAIL(RL_ERR_INVALID, "CUDA dequantize: quantization family %d (type %d) is not "
                       "supported by this build (supported: GGUF blocks, AWQ, GPTQ, FP8)",
                       q->family, q->subtype);
    return RL_OK;
}

static rl_status dequant_rows_in(rl_backend *be, const rl_qtensor *q, int64_t r0, int64_t r1,
                                 void *out, rl_dtype out_dtype)
{
    RL_TRY(dequant_check(q));
    if (dequant_is_hf(q))
        CU_CHECK(rl_k_dequant_hf(impl_of(be)->stream, q, r0, r1, out, out_dtype == RL_F32));
    else
        CU_CHECK(rl_k_dequant_gguf(impl_of(be)->stream, q->subtype, q->part[0],
                                   rl_qtensor_row_bytes(q), q->cols, r0, r1, out,
                                   out_dtype == RL_F32));
    return RL_OK;
}

static rl_status cuda_dequant_rows(rl_backend *be, const rl_qtensor *q, int64_t r0, int64_t r1,
                                   void *out, rl_dtype out_dtype)
{
    ON_OP(be, "dequantize", dequant_rows_in(be, q, r0, r1, out, out_dtype));
}

static rl_status dequant_gather_in(rl_backend *be, const rl_qtensor *q, const int32_t *tokens,
                                   int64_t T, void *x, float scale)
{
    RL_TRY(dequant_check(q));
    if (dequant_is_hf(q))
        CU_CHECK(rl_k_dequant_hf_gather(impl_of(be)->stream, q, tokens, T, x, scale,
                                        !impl_of(be)->f32));
    else
        CU_CHECK(rl_k_dequant_gather(impl_of(be)->stream, q->subtype, q->part[0],
                                     rl_qtensor_row_bytes(q), q->cols, tokens, T, x, scale,
                                     !impl_of(be)->f32));
    return RL_OK;
}

static rl_status cuda_dequant_gather(rl_backend *be, const rl_qtensor *q, const int32_t *tokens,
                                     int64_t T, void *x, float scale)
{
    ON_OP(be, "embed", dequant_gather_in(be, q, tokens, T, x, scale));
}

static rl_status cuda_rmsnorm(rl_backend *be, const void *x, rl_dtype x_dtype, const void *w,
                              void *y, rl_dtype out_dtype, int64_t rows, int64_t d, float eps,
                              float w_offset, int accumulate)
{
    ON_OP(be, "rmsnorm", rmsnorm_in(be, x, x_dtype, w, y, out_dtype, rows, d, eps, w_offset, accumulate));
}

static rl_status cuda_gemm(rl_backend *be, const rl_segments *seg, const void *x, const void *w,
                           const void *bias, void *y, int64_t M, int64_t N, int64_t K,
                           int accumulate)
{
    ON_OP(be, "gemm", gemm_in(be, seg, x, w, bias, y, M, N, K, accumulate));
}

static rl_status cuda_qk_norm_rope(rl_backend *be, const rl_segments *seg, void *qkv, int64_t T,
                                   int64_t nh, int64_t nkv, int64_t hd, const void *q_norm,
                                   const void *k_norm, int norm_mode, float w_offset, float eps,
                                   const float *inv_freq)
{
    ON_OP(be, "qk_norm_rope", qk_norm_rope_in(be, seg, qkv, T, nh, nkv, hd, q_norm, k_norm, norm_mode,
                                   w_offset, eps, inv_freq));
}

static rl_status cuda_attention(rl_backend *be, const rl_segments *seg, const void *qkv,
                                void *out, int64_t T, int64_t nh, int64_t nkv, int64_t hd,
                                float scale, int64_t window, float softcap)
{
    ON_OP(be, "attention", attention_in(be, seg, qkv, out, T, nh, nkv, hd, scale, window, softcap));
}

static rl_status cuda_glu(rl_backend *be, const void *gu, void *out, int64_t T, int64_t ff, int act)
{
    ON_OP(be, "glu", glu_in(be, gu, out, T, ff, act));
}

static rl_status cuda_cast(rl_backend *be, const void *src, rl_dtype src_dtype, void *dst,
                           rl_dtype dst_dtype, int64_t n)
{
    ON_OP(be, "cast", cast_in(be, src, src_dtype, dst, dst_dtype, n));
}

static rl_status cuda_pool(rl_backend *be, const void *x, rl_dtype src_dtype, int64_t d,
                           const int32_t *spans_abs, int64_t S, rl_pool mode, float *out)
{
    ON_OP(be, "pool", pool_in(be, x, src_dtype, d, spans_abs, S, mode, out));
}

/* ---- creation / destruction -------------------------------------------- */

static void cuda_destroy(rl_backend *be)
{
    if (!be) return;
    cuda_impl *im = impl_of(be);
    if (im) {
        dev_scope sc;
        int entered = scope_enter(&sc, im->device) == RL_OK;
        if (im->stream) (void)cudaStreamSynchronize(im->stream);
        if (im->handle && im->blas.destroy) (void)im->blas.destroy(im->handle);
        if (im->blas_ws) (void)cudaFree(im->blas_ws);
        for (int i = 0; i < 2; i++) {
            if (im->stage[i]) (void)cudaFreeHost(im->stage[i]);
            if (im->stage_done[i]) (void)cudaEventDestroy(im->stage_done[i]);
        }
        if (im->work_done) (void)cudaEventDestroy(im->work_done);
        if (im->stream) (void)cudaStreamDestroy(im->stream);
        rl_cublas_unload(&im->blas);
        (void)cudaGetLastError();
        if (entered) scope_leave(&sc);
        free(im);
    }
    free(be);
}

/* bf16 or f32 storage; the head dims the attention kernels are instantiated
 * for (rl_k_attention_supports); at most 65535 query heads (the attention
 * grid's z dimension); every pooling; every feature beyond the Llama block
 * (Gemma-2/3, OLMo-2: the ops above take their parameters). */
static const int16_t CUDA_HEAD_DIMS[] = {16, 32, 64, 80, 96, 128, 256};
static const rl_backend_caps CUDA_CAPS = {
    .dtypes = (1u << RL_BF16) | (1u << RL_F32),
    .poolings = (1u << RL_POOL_MEAN) | (1u << RL_POOL_FIRST) | (1u << RL_POOL_LAST) |
                (1u << RL_POOL_MAX),
    .head_dims = CUDA_HEAD_DIMS,
    .n_head_dims = (int)(sizeof CUDA_HEAD_DIMS / sizeof CUDA_HEAD_DIMS[0]),
    .max_heads = 65535,
    .features = (1u << RL_FEAT_EMBED_SCALE) | (1u << RL_FEAT_NORM_OFFSET) |
                (1u << RL_FEAT_GELU_TANH) | (1u << RL_FEAT_POST_NORMS) |
                (1u << RL_FEAT_NO_PRE_NORMS) | (1u << RL_FEAT_QK_NORM_PROJ) |
                (1u << RL_FEAT_SOFTCAP) | (1u << RL_FEAT_SLIDING_WINDOW) |
                (1u << RL_FEAT_ROPE_SWA),
};

rl_status rl_cuda_caps(rl_backend_caps *out)
{
    *out = CUDA_CAPS;
    /* the list above and the kernels' own must agree */
    for (int i = 0; i < CUDA_CAPS.n_head_dims; i++)
        if (!rl_k_attention_supports(CUDA_HEAD_DIMS[i]))
            return RL_FAIL(RL_ERR_DEVICE, "internal: the CUDA attention kernel lacks head_dim %d",
                           (int)CUDA_HEAD_DIMS[i]);
    return RL_OK;
}

static void fill_table(rl_backend *be, rl_dtype dtype)
{
    be->weight_dtype = dtype;
    be->act_dtype = dtype;
    be->res_dtype = RL_F32;
    be->alloc = cuda_alloc;
    be->free = cuda_free;
    be->host_alloc = cuda_host_alloc;
    be->host_release = cuda_host_release;
    be->upload = cuda_upload;
    be->upload_i32 = cuda_upload_i32;
    be->download_f32 = cuda_download_f32;
    be->download_f32_async = cuda_download_f32_async;
    be->sync = cuda_sync;
    be->mem_info = cuda_mem_info_be;
    be->is_resident = cuda_is_resident;
    be->embed = cuda_embed;
    be->rmsnorm = cuda_rmsnorm;
    be->gemm = cuda_gemm;
    be->qk_norm_rope = cuda_qk_norm_rope;
    be->attention = cuda_attention;
    be->glu = cuda_glu;
    be->cast = cuda_cast;
    be->pool = cuda_pool;
    be->dequant_rows = cuda_dequant_rows;
    be->dequant_gather = cuda_dequant_gather;
    be->destroy = cuda_destroy;
    be->caps = &CUDA_CAPS;
}

/* Stream, events, cuBLAS handle and workspace of a fresh backend. */
static rl_status init_impl(cuda_impl *im)
{
    CU_CHECK(cudaStreamCreateWithFlags(&im->stream, cudaStreamNonBlocking));
    for (int i = 0; i < 2; i++)
        CU_CHECK(cudaEventCreateWithFlags(&im->stage_done[i], cudaEventDisableTiming));
    CU_CHECK(cudaEventCreateWithFlags(&im->work_done, cudaEventDisableTiming));
    RL_TRY(rl_cublas_load(&im->blas));
    BLAS_CHECK(im, im->blas.create(&im->handle));
    BLAS_CHECK(im, im->blas.set_stream(im->handle, im->stream));
    /* default math (no TF32) and no reduction in the output type: a bf16 GEMM
     * that cuBLAS splits along K adds its partial sums in f32, so the output is
     * rounded to bf16 once */
    BLAS_CHECK(im, im->blas.set_math_mode(im->handle, RL_CUBLAS_DEFAULT_MATH |
                                          RL_CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    CU_CHECK(cudaMalloc(&im->blas_ws, BLAS_WORKSPACE_BYTES));
    BLAS_CHECK(im, im->blas.set_workspace(im->handle, im->blas_ws, BLAS_WORKSPACE_BYTES));
    /* everything that picks other kernels (and so other result bits): the
     * architecture, cuBLAS's version and its heuristics' input (the SM count),
     * and which attention kernel runs */
    int major = 0, minor = 0, sms = 0, version = 0;
    CU_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, im->device));
    CU_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, im->device));
    CU_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, im->device));
    BLAS_CHECK(im, im->blas.get_version(im->handle, &version));
#ifdef RL_CUDA_EMULATED /* kernels/emu: says what it is wherever the kernel string goes */
    snprintf(im->kernel, sizeof im->kernel, "emulated sm_%d%d on the CPU (cuBLAS stand-in) "
             "attention %s", major, minor, im->f32 || !im->attn_mma ? "fma" : "mma");
    (void)sms; /* the emulator's worker count: no bit of a result depends on it */
    (void)version;
#else
    snprintf(im->kernel, sizeof im->kernel, "sm_%d%d %d SMs cuBLAS %d attention %s", major, minor,
             sms, version, im->f32 || !im->attn_mma ? "fma" : "mma");
#endif
    return RL_OK;
}

rl_status rl_backend_cuda_create_ex(int device_index, rl_dtype dtype, rl_backend **out)
{
    *out = NULL;
    if (dtype != RL_BF16 && dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "CUDA backend dtype must be bf16 or f32, got %s",
                       rl_dtype_name(dtype));
    RL_TRY(check_device(device_index));
    rl_backend *be = calloc(1, sizeof *be);
    cuda_impl *im = calloc(1, sizeof *im);
    if (!be || !im) {
        free(be);
        free(im);
        return RL_FAIL(RL_ERR_NOMEM, "out of host memory creating the CUDA backend");
    }
    im->device = device_index;
    const char *attn = getenv("RJEPA_ATTN"); /* "fma": the CUDA-core attention kernel */
    im->attn_mma = !(attn && strcmp(attn, "fma") == 0);
    im->f32 = dtype == RL_F32;
    const char *sync_env = getenv("RJEPA_CUDA_SYNC"); /* "1": find the op that faults */
    im->sync_each = sync_env && strcmp(sync_env, "1") == 0;
    snprintf(im->name, sizeof im->name, "cuda:%d", device_index);
    be->impl = im;
    be->name = im->name;
    be->kernel = im->kernel;
    fill_table(be, dtype);
    dev_scope sc;
    rl_status st = scope_enter(&sc, device_index);
    if (st == RL_OK) {
        st = init_impl(im);
        scope_leave(&sc);
    }
    if (st != RL_OK) {
        cuda_destroy(be); /* keeps the message: destroy records none (unless the device
                             cannot even be made current, the same failure) */
        return st;
    }
    *out = be;
    return RL_OK;
}

rl_status rl_backend_cuda_create(int device_index, rl_backend **out)
{
    return rl_backend_cuda_create_ex(device_index, RL_BF16, out);
}

#else  /* !RL_WITH_CUDA: csrc/cuda_stub.c provides the stand-ins */
typedef int rl_cuda_backend_unused_; /* ISO C forbids an empty translation unit */
#endif /* RL_WITH_CUDA */
