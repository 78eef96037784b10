/* test_backend_ops.c - every op of the backend table (struct rl_backend,
 * csrc/engine.h) against a reference; one line per case, exit status 1 on
 * any failure.
 *
 *   test_backend_ops cpu  [--seed S] [--filter TEXT] [--list] [-v]
 *   test_backend_ops cuda [--seed S] [--filter TEXT] [--list] [-v]
 *
 * In the spirit of ggml's tests/test-backend-ops.cpp: a table of cases (op,
 * shapes, parameters), one harness that runs each case on the backend under
 * test and on a reference and compares them by a normalised error against a
 * bound of the op and storage mode. Adding a case is adding a table row.
 *
 * Built from engine.h itself (compiled with the C sources of the extension;
 * tests/test_backend_ops.py does that), so the op table is never mirrored by
 * hand: every op is called through its named field.
 *
 * cpu mode (CI, every push): the CPU backend against naive double-precision
 * references written here, on unrounded f32 inputs; plus the packing
 * contract of docs/design.md, bitwise on the CPU (gemm, qk_norm_rope and
 * attention of a packed batch give, row for row, the bits of each sequence
 * run alone), and self-checks of the harness (a TF32-rounded GEMM, a
 * bf16-rounded output, a NaN, a one-ulp change must each fail the bound that
 * is meant to catch it).
 *
 * cuda mode: every CUDA op against the CPU op on identical inputs, for the
 * storage modes rl_backend_cuda_create_ex(0, RL_BF16 | RL_F32, ..), and the
 * attention also with RJEPA_ATTN=fma (the CUDA-core kernel):
 * - inputs are drawn in f32 and rounded to the storage dtype of the backend
 *   under test (bf16 in the bf16 mode), so both backends see the same values;
 *   the fp32 mode gets unrounded f32 inputs (with bf16-rounded ones a TF32
 *   GEMM would be exact in every product and could not be told apart);
 * - outputs are poisoned with NaN on both backends first, so an unwritten
 *   element fails (NaN never passes);
 * - bounds: bf16 outputs within bf16 rounding (BF16_EPS = 2^-8 relative: one
 *   rounding of the output), f32 outputs within f32 rounding and summation
 *   order (1e-5 to 1e-3 relative, per op); the fp32 mode within F32_REL of
 *   both the CPU op and the double reference, which a TF32 GEMM (inputs
 *   rounded to 2^-11) fails (the harness self-check shows it on the CPU);
 * - ops the CPU backend lacks (a bf16 pool source) are compared with the
 *   double reference; a head_dim the CUDA attention lacks must be refused;
 * - a case using a feature beyond the Llama block (rl_feature: embedding
 *   scale, norm offset, post-norm accumulation, whole-projection q/k norm,
 *   sliding window, soft-capping, GELU-tanh, cast) runs where the backend's
 *   caps state that feature; where they do not, the op must refuse it
 *   (caps and ops agree either way);
 * - dequant (a device op only: the CPU engine dequantizes kept weights
 *   itself): AWQ / GPTQ / FP8 rows and gathered embedding rows against
 *   csrc/quant_hf.c, bit-exact in f32 and that rounded once in bf16.
 *
 * The normalised error of a check is max_i |got_i - ref_i| / (|ref_i| +
 * floor * rms(ref)): relative where values are large, relative to the
 * output's scale near zero (floor, per op). Each case prints its worst check
 * as "err <error> / <bound>"; a bound of 0 means bit-exact. A failing case
 * prints the seed and the command that reruns it.
 *
 * Exit status: 0 all passed, 1 a case failed, 2 usage or setup error, 77 cuda
 * mode without a usable CUDA device (the message says why).
 */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "quant_hf.h"

/* ---- bounds ------------------------------------------------------------- */

#define BF16_EPS (1.0 / 256)   /* 2^-8: unit roundoff of bf16 (8-bit significand) */
#define F32_REL 1e-4           /* fp32 CUDA mode; TF32 is ~2^-11 per product    */
#define F32_FLOOR 0.5          /* ... relative to |ref| + rms/2                 */
#define SMALL_FLOOR (1.0 / 64) /* most ops: relative to |ref| + rms/64          */

typedef struct {
    double rel;   /* bound on the normalised error; 0: bit-exact            */
    double floor; /* near-zero floor, in units of rms(ref)                  */
    double nrm;   /* bound on ||got - ref|| / ||ref|| too (0: not checked)   */
    const double *tol; /* per element: the error is |got - ref| / tol[i]
                          (an error model's bound), not relative (NULL)     */
} bound;

static const bound EXACT = {0, 0, 0};

/* ---- random numbers (splitmix64) --------------------------------------- */

typedef struct { uint64_t s; } rng_t;

static uint64_t rng_u64(rng_t *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_unif(rng_t *r) { return (double)(rng_u64(r) >> 11) * 0x1p-53; }

static double rng_normal(rng_t *r)
{
    double u = rng_unif(r), v = rng_unif(r);
    return sqrt(-2.0 * log(u + 0x1p-60)) * cos(6.283185307179586 * v);
}

static int64_t rng_int(rng_t *r, int64_t n) { return (int64_t)(rng_u64(r) % (uint64_t)n); }

/* ---- dtype helpers, written here (independent of csrc/common.c) ---------- */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* nearest bf16 (ties to even) as f32; NaN stays NaN */
static float bf16_round(float f)
{
    if (isnan(f)) return f;
    uint32_t u = f2u(f);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return u2f(u);
}

/* nearest TF32 (10 mantissa bits, ties to even): what a TF32 GEMM reads */
static float tf32_round(float f)
{
    uint32_t u = f2u(f);
    u = (u + 0xFFFu + ((u >> 13) & 1u)) & ~0x1FFFu;
    return u2f(u);
}

static float f16_decode(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (float)(s ? -v : v);
}

static float bf16_decode(uint16_t h) { return u2f((uint32_t)h << 16); }

static void round_to(float *x, size_t n, rl_dtype dt)
{
    if (dt == RL_BF16)
        for (size_t i = 0; i < n; i++) x[i] = bf16_round(x[i]);
}

/* ---- host memory of one case (freed when the case ends) ----------------- */

#define MAX_HOST 512
static void *g_host[MAX_HOST];
static int g_nhost;

static void *halloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p || g_nhost == MAX_HOST) {
        fprintf(stderr, "test_backend_ops: out of host memory (%zu bytes)\n", bytes);
        exit(2);
    }
    g_host[g_nhost++] = p;
    return p;
}

static float *hf(size_t n) { return halloc(n * sizeof(float)); }
static double *hd(size_t n) { return halloc(n * sizeof(double)); }

static void hfree_all(void)
{
    while (g_nhost) free(g_host[--g_nhost]);
}

static double *widen(const float *x, size_t n)
{
    double *y = hd(n);
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

static float *normals(rng_t *r, size_t n, double scale, double offset)
{
    float *x = hf(n);
    for (size_t i = 0; i < n; i++) x[i] = (float)(offset + scale * rng_normal(r));
    return x;
}

/* ---- a backend and its buffers ------------------------------------------ */

#define MAX_BUFS 64

typedef struct {
    rl_backend *be;
    const char *label;         /* "cpu", "cuda-bf16", "cuda-bf16-fma", "cuda-f32" */
    void *bufs[MAX_BUFS];
    int nbufs;
} tdev;

static char g_err[1024]; /* why the running case could not be completed */

#define TRY(dv, expr)                                                                       \
    do {                                                                                    \
        rl_status st_ = (expr);                                                             \
        if (st_ != RL_OK) {                                                                 \
            snprintf(g_err, sizeof g_err, "%s: %s returned %d: %s", (dv)->label, #expr,     \
                     (int)st_, rl_last_error());                                            \
            return -1;                                                                      \
        }                                                                                   \
    } while (0)
#define TRYI(expr) do { if ((expr) != 0) return -1; } while (0)

static void d_release(tdev *d)
{
    while (d->nbufs) d->be->free(d->be, d->bufs[--d->nbufs]);
}

/* bytes + 16: a bf16 buffer of odd length can be read back as f32 words */
static int d_alloc(tdev *d, size_t bytes, void **p)
{
    *p = NULL;
    if (d->nbufs == MAX_BUFS) {
        snprintf(g_err, sizeof g_err, "test_backend_ops: more than %d buffers", MAX_BUFS);
        return -1;
    }
    TRY(d, d->be->alloc(d->be, p, bytes + 16));
    d->bufs[d->nbufs++] = *p;
    return 0;
}

/* new buffer of n elements of dt holding x (f32 values) */
static int d_put(tdev *d, const float *x, size_t n, rl_dtype dt, void **p)
{
    TRYI(d_alloc(d, n * rl_dtype_size(dt), p));
    if (n) TRY(d, d->be->upload(d->be, *p, dt, 0, x, RL_F32, n));
    return 0;
}

/* new buffer of n elements of dt, every element NaN */
static int d_empty(tdev *d, size_t n, rl_dtype dt, void **p)
{
    float *nan = hf(n);
    for (size_t i = 0; i < n; i++) nan[i] = NAN;
    return d_put(d, nan, n, dt, p);
}

static int d_put_i32(tdev *d, const int32_t *x, size_t n, int32_t **p)
{
    void *v;
    TRYI(d_alloc(d, n * 4, &v));
    *p = v;
    if (n) TRY(d, d->be->upload_i32(d->be, *p, x, n));
    return 0;
}

/* n elements of a buffer of dt as f32 (bf16 read as f32 words, then widened) */
static int d_get(tdev *d, const void *p, size_t n, rl_dtype dt, float *out)
{
    if (dt == RL_F32) {
        TRY(d, d->be->download_f32(d->be, out, p, n));
        return 0;
    }
    size_t words = (n + 1) / 2;
    float *w = hf(words);
    TRY(d, d->be->download_f32(d->be, w, p, words));
    const uint16_t *h = (const uint16_t *)w;
    for (size_t i = 0; i < n; i++) out[i] = bf16_decode(h[i]);
    return 0;
}

/* a packed batch of sequences of the given lengths */
typedef struct {
    rl_segments seg;
    int32_t *cu;   /* host [B+1] */
    int32_t *pos;  /* host [T]   */
    int64_t T;
} tseg;

static int n_lens(const int *lens)
{
    int n = 0;
    while (n < 8 && lens[n] > 0) n++;
    return n;
}

static int d_segments(tdev *d, const int *lens, int nl, tseg *s)
{
    s->cu = halloc((size_t)(nl + 1) * 4);
    s->cu[0] = 0;
    int64_t mx = 0;
    for (int i = 0; i < nl; i++) {
        s->cu[i + 1] = s->cu[i] + lens[i];
        if (lens[i] > mx) mx = lens[i];
    }
    s->T = s->cu[nl];
    s->pos = halloc((size_t)s->T * 4 + 4);
    for (int i = 0; i < nl; i++)
        for (int j = 0; j < lens[i]; j++) s->pos[s->cu[i] + j] = j;
    int32_t *cu_dev, *pos_dev;
    TRYI(d_put_i32(d, s->cu, (size_t)nl + 1, &cu_dev));
    TRYI(d_put_i32(d, s->pos, (size_t)s->T, &pos_dev));
    s->seg = (rl_segments){.cu_seqlens_host = s->cu, .cu_seqlens_dev = cu_dev,
                           .positions_dev = pos_dev, .n_seqs = nl, .max_seqlen = mx};
    return 0;
}

/* ---- the case table ------------------------------------------------------ */

typedef enum {
    OP_BACKEND, OP_MEMORY, OP_EMBED, OP_RMSNORM, OP_GEMM, OP_QK_NORM_ROPE, OP_ATTENTION,
    OP_GLU, OP_POOL, OP_UPLOAD, OP_DOWNLOAD, OP_CAST, OP_DEQUANT, OP_HARNESS
} op_t;

static const char *const OP_NAMES[] = {"backend", "memory", "embed", "rmsnorm", "gemm",
                                       "qk_norm_rope", "attention", "glu", "pool", "upload",
                                       "download", "cast", "dequant", "harness"};

enum { BOTH = 0, CPU_ONLY = 1, CUDA_ONLY = 2 };

typedef struct {
    op_t op;
    int64_t n, d;        /* embed (T, d), rmsnorm (rows, d), swiglu (T, ff), pool (T, d),
                            upload / download (n elements, -)                              */
    int64_t M, N, K;     /* gemm                                                            */
    int64_t nh, nkv, hd; /* qk_norm_rope, attention                                         */
    int lens[8];         /* packed sequence lengths (gemm, qk_norm_rope, attention), 0-ended */
    int bias, acc;       /* gemm: with a bias; accumulate into the f32 residual             */
    int out_res;         /* rmsnorm: output in res_dtype (f32) instead of act_dtype         */
    int norms;           /* qk_norm_rope: rl_qk_norm (0 none, 1 per head, 2 whole projection) */
    float scale;         /* embed: the scale (0: 1)                                         */
    float w_off;         /* rmsnorm, qk_norm_rope: weight offset (Gemma's 1 + w)             */
    int accum;           /* rmsnorm: y (res) += norm (a post-norm)                          */
    int x_act;           /* rmsnorm: input in act_dtype (the output of a GEMM)              */
    int window;          /* attention: sliding window (0: none)                             */
    float softcap;       /* attention: logit soft-cap (0: none)                             */
    int act;             /* glu: rl_act                                                     */
    int feat;            /* 1 + the rl_feature it uses (0: none)                            */
    rl_pool pool;        /* pool mode                                                       */
    rl_dtype src;        /* pool source / upload source dtype                               */
    int dst_f32;         /* upload: destination f32 instead of weight_dtype                 */
    int where;           /* BOTH, CPU_ONLY, CUDA_ONLY                                       */
    int cuda_refuses;    /* the CUDA backend must refuse it (RL_ERR_INVALID)                */
    int qf, qbits, qgroup; /* dequant: rl_qfamily (quant_hf.h), bits, group / block edge    */
    int qflags;          /* dequant: QZ zero points stored, QG g_idx, QV1 zeros minus one   */
} tcase;

enum { QZ = 1, QG = 2, QV1 = 4 };

#define GEMM(m, n_, k, b, a, ...) {.op = OP_GEMM, .M = m, .N = n_, .K = k, .bias = b, .acc = a, \
                                   .lens = {__VA_ARGS__}}
#define QK(h, kv, d_, nm) {.op = OP_QK_NORM_ROPE, .nh = h, .nkv = kv, .hd = d_, .norms = nm, \
                           .lens = {1, 7, 130}, .feat = (nm) == 2 ? 1 + RL_FEAT_QK_NORM_PROJ : 0}
#define QKO(h, kv, d_, nm) {.op = OP_QK_NORM_ROPE, .nh = h, .nkv = kv, .hd = d_, .norms = nm, \
                            .w_off = 1, .lens = {1, 7, 130}, .feat = 1 + RL_FEAT_NORM_OFFSET}
/* sliding window w and / or soft-cap c: lengths below, at and far above the
 * window, packed (the window never reaches into the previous sequence) */
#define ATTNW(d_, h, kv, w, c, ...) {.op = OP_ATTENTION, .hd = d_, .nh = h, .nkv = kv, .window = w, \
                                     .softcap = c, .lens = {__VA_ARGS__}, \
                                     .feat = 1 + ((w) ? RL_FEAT_SLIDING_WINDOW : RL_FEAT_SOFTCAP)}
#define ATTN(d_, h, kv, ...) {.op = OP_ATTENTION, .hd = d_, .nh = h, .nkv = kv, .lens = {__VA_ARGS__}}
#define POOL(dd, mode, s) {.op = OP_POOL, .n = 300, .d = dd, .pool = mode, .src = s, \
                           .where = (s) == RL_F32 ? BOTH : CUDA_ONLY}
#define UPLOAD(nn, s, f) {.op = OP_UPLOAD, .n = nn, .src = s, .dst_f32 = f}
/* weights kept quantized: rows x cols of family f, scales of dtype s */
#define DEQ(f, b, g, fl, s, r, c) {.op = OP_DEQUANT, .qf = f, .qbits = b, .qgroup = g, .qflags = fl, \
                                   .src = s, .n = r, .d = c, .where = CUDA_ONLY}

static const tcase CASES[] = {
    {.op = OP_BACKEND},
    {.op = OP_MEMORY},
    {.op = OP_HARNESS, .where = CPU_ONLY},

    {.op = OP_EMBED, .n = 77, .d = 64},
    {.op = OP_EMBED, .n = 77, .d = 100},
    {.op = OP_EMBED, .n = 33, .d = 4096},
    {.op = OP_EMBED, .n = 77, .d = 100, .scale = 47.958315f, .feat = 1 + RL_FEAT_EMBED_SCALE},

    {.op = OP_RMSNORM, .n = 37, .d = 1},
    {.op = OP_RMSNORM, .n = 37, .d = 64},
    {.op = OP_RMSNORM, .n = 37, .d = 100},
    {.op = OP_RMSNORM, .n = 37, .d = 4096},
    {.op = OP_RMSNORM, .n = 37, .d = 1, .out_res = 1},
    {.op = OP_RMSNORM, .n = 37, .d = 64, .out_res = 1},
    {.op = OP_RMSNORM, .n = 37, .d = 100, .out_res = 1},
    {.op = OP_RMSNORM, .n = 37, .d = 4096, .out_res = 1},
    /* Gemma's (1 + w), into act or res; post-norms: an act input normed and
     * added to the residual */
    {.op = OP_RMSNORM, .n = 37, .d = 100, .w_off = 1, .feat = 1 + RL_FEAT_NORM_OFFSET},
    {.op = OP_RMSNORM, .n = 37, .d = 4096, .w_off = 1, .out_res = 1, .feat = 1 + RL_FEAT_NORM_OFFSET},
    {.op = OP_RMSNORM, .n = 37, .d = 64, .x_act = 1, .accum = 1, .out_res = 1,
     .feat = 1 + RL_FEAT_POST_NORMS},
    {.op = OP_RMSNORM, .n = 37, .d = 2304, .x_act = 1, .accum = 1, .out_res = 1, .w_off = 1,
     .feat = 1 + RL_FEAT_POST_NORMS},

    /* every (bias, accumulate) pair; one and several sequences; a sequence of
     * >= 256 rows (the CPU splits it into 256-column jobs, N = 600 leaves a
     * partial one); N, K multiples of 4 but not 8 */
    GEMM(1, 64, 64, 0, 0, 1), GEMM(1, 64, 64, 1, 0, 1),
    GEMM(1, 64, 64, 0, 1, 1), GEMM(1, 64, 64, 1, 1, 1),
    GEMM(37, 96, 200, 0, 0, 12, 13, 12), GEMM(37, 96, 200, 1, 0, 12, 13, 12),
    GEMM(37, 96, 200, 0, 1, 12, 13, 12), GEMM(37, 96, 200, 1, 1, 12, 13, 12),
    GEMM(300, 256, 128, 0, 0, 100, 100, 100), GEMM(300, 256, 128, 1, 1, 100, 100, 100),
    GEMM(301, 600, 64, 0, 0, 1, 300), GEMM(301, 600, 64, 1, 1, 1, 300),
    GEMM(5, 24, 8, 0, 0, 5), GEMM(5, 24, 8, 1, 1, 2, 3),
    GEMM(20, 100, 68, 1, 0, 20), GEMM(64, 512, 1024, 0, 1, 64),

    QK(4, 2, 64, 0), QK(4, 2, 64, 1), QK(2, 1, 128, 0), QK(2, 1, 128, 1),
    QK(3, 3, 16, 0), QK(3, 3, 16, 1), QK(2, 2, 80, 0), QK(2, 2, 80, 1),
    /* Gemma-3: per head with (1 + w); OLMo-2: over the whole q / k row */
    QKO(4, 2, 64, 1), QKO(2, 1, 256, 1),
    QK(4, 2, 64, 2), QK(8, 2, 128, 2), QK(3, 3, 16, 2),

    /* GQA 1:1, 2:1, 3:1, 4:1, 8:1; every head dim the CUDA kernels have (16
     * to 256) and one they lack (24: CUDA must refuse it); lengths around
     * the 64-query tile, odd ones, single tokens; packed and alone */
    ATTN(64, 4, 2, 1, 5, 64, 65, 130),
    ATTN(128, 4, 1, 200, 3, 1),
    ATTN(128, 8, 8, 17),
    ATTN(128, 8, 1, 63, 66),
    ATTN(16, 2, 2, 70, 1),
    ATTN(32, 4, 2, 33),
    ATTN(80, 2, 1, 40, 90),
    ATTN(96, 3, 1, 129),
    ATTN(256, 2, 2, 33, 100),
    {.op = OP_ATTENTION, .hd = 24, .nh = 2, .nkv = 1, .lens = {4, 9}, .cuda_refuses = 1},
    ATTNW(64, 4, 2, 8, 0, 1, 8, 9, 70, 200),
    ATTNW(128, 4, 1, 64, 0, 63, 64, 65, 130, 3),
    ATTNW(256, 2, 1, 100, 0, 300, 17),
    ATTNW(16, 2, 2, 1, 0, 5, 40),          /* window 1: each token sees itself only */
    ATTNW(256, 8, 4, 0, 50, 1, 5, 64, 130),
    ATTNW(64, 4, 2, 0, 2, 33, 100),         /* a cap that binds on most scores */
    ATTNW(128, 4, 2, 16, 5, 1, 16, 17, 150),

    {.op = OP_GLU, .n = 33, .d = 64},
    {.op = OP_GLU, .n = 33, .d = 100},
    {.op = OP_GLU, .n = 33, .d = 1376},
    {.op = OP_GLU, .n = 33, .d = 64, .act = RL_ACT_GELU_TANH, .feat = 1 + RL_FEAT_GELU_TANH},
    {.op = OP_GLU, .n = 33, .d = 1376, .act = RL_ACT_GELU_TANH, .feat = 1 + RL_FEAT_GELU_TANH},

    /* the residual as a GEMM operand (no pre-norm, OLMo-2) */
    {.op = OP_CAST, .n = 1, .feat = 1 + RL_FEAT_NO_PRE_NORMS},
    {.op = OP_CAST, .n = 100001, .feat = 1 + RL_FEAT_NO_PRE_NORMS},

    POOL(64, RL_POOL_MEAN, RL_F32), POOL(64, RL_POOL_FIRST, RL_F32), POOL(64, RL_POOL_LAST, RL_F32),
    POOL(100, RL_POOL_MEAN, RL_F32), POOL(100, RL_POOL_FIRST, RL_F32),
    POOL(100, RL_POOL_LAST, RL_F32),
    POOL(64, RL_POOL_MAX, RL_F32), POOL(100, RL_POOL_MAX, RL_F32),
    POOL(64, RL_POOL_MEAN, RL_BF16), POOL(64, RL_POOL_FIRST, RL_BF16),
    POOL(64, RL_POOL_LAST, RL_BF16), POOL(100, RL_POOL_MEAN, RL_BF16),
    POOL(64, RL_POOL_MAX, RL_BF16), POOL(100, RL_POOL_MAX, RL_BF16),
    /* activation sites: rows as wide as an MLP (mlp_post) or odd widths, from the
     * residual (f32) and from GEMM operands (bf16 on CUDA: attn_z, mlp_post, a
     * pre-norm family's attn_out / mlp_out), copied per token (first) and pooled */
    POOL(2816, RL_POOL_FIRST, RL_F32), POOL(2816, RL_POOL_FIRST, RL_BF16),
    POOL(2816, RL_POOL_MEAN, RL_BF16), POOL(1000, RL_POOL_MAX, RL_BF16),
    POOL(1000, RL_POOL_LAST, RL_F32),

    /* 17M elements: larger than the CUDA backend's 32 MiB staging buffer in
     * every dtype (several chunks), and than the CPU's 64K-element chunks */
    UPLOAD(1001, RL_F32, 0), UPLOAD(1001, RL_BF16, 0), UPLOAD(1001, RL_F16, 0),
    UPLOAD(1001, RL_F32, 1), UPLOAD(1001, RL_BF16, 1), UPLOAD(1001, RL_F16, 1),
    UPLOAD(17000000, RL_F32, 0), UPLOAD(17000000, RL_BF16, 0), UPLOAD(17000000, RL_F16, 0),
    UPLOAD(17000000, RL_F32, 1),

    {.op = OP_DOWNLOAD, .n = 1},
    {.op = OP_DOWNLOAD, .n = 4097},

    /* AWQ / GPTQ / FP8 kept quantized (csrc/quant_hf.c is the reference):
     * shapes that leave partial 32 x 32 tiles, every scale dtype, GPTQ with
     * and without zero points and g_idx, v1 zeros, 2 / 4 / 8 bits, FP8
     * blocks that do not divide the shape */
    DEQ(RL_QF_AWQ, 4, 32, QZ, RL_F16, 72, 96), DEQ(RL_QF_AWQ, 4, 64, 0, RL_BF16, 40, 128),
    DEQ(RL_QF_AWQ, 4, 128, QZ, RL_F32, 136, 256),
    DEQ(RL_QF_GPTQ, 4, 32, QZ | QV1, RL_F16, 72, 96), DEQ(RL_QF_GPTQ, 4, 32, 0, RL_F16, 40, 64),
    DEQ(RL_QF_GPTQ, 4, 32, QZ | QG, RL_BF16, 72, 96), DEQ(RL_QF_GPTQ, 8, 64, QG, RL_F32, 36, 128),
    DEQ(RL_QF_GPTQ, 2, 16, QZ | QG | QV1, RL_F16, 48, 80), DEQ(RL_QF_GPTQ, 8, 0, QZ, RL_F16, 36, 48),
    DEQ(RL_QF_FP8_BLOCK, 8, 32, 0, RL_F32, 70, 100), DEQ(RL_QF_FP8_BLOCK, 8, 16, 0, RL_BF16, 33, 48),
    DEQ(RL_QF_FP8_BLOCK, 8, 128, 0, RL_F16, 130, 200),
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

static void fmt_lens(const int *lens, char *buf, size_t n)
{
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; i < n_lens(lens) && at < n; i++)
        at += (size_t)snprintf(buf + at, n - at, "%s%d", i ? "+" : "", lens[i]);
}

static const char *dt_name(rl_dtype dt)
{
    return dt == RL_F32 ? "f32" : dt == RL_BF16 ? "bf16" : dt == RL_F16 ? "f16" : "?";
}

static void case_name(const tcase *c, char *buf, size_t n)
{
    static const char *const pools[] = {"mean", "first", "last", "max"};
    char lens[64];
    fmt_lens(c->lens, lens, sizeof lens);
    const char *op = OP_NAMES[c->op];
    switch (c->op) {
    case OP_EMBED:
        snprintf(buf, n, "%s T=%lld d=%lld%s", op, (long long)c->n, (long long)c->d,
                 c->scale != 0 ? " scale" : "");
        break;
    case OP_RMSNORM:
        snprintf(buf, n, "%s rows=%lld d=%lld%s out=%s%s%s", op, (long long)c->n, (long long)c->d,
                 c->x_act ? " in=act" : "", c->out_res ? "res" : "act", c->accum ? " +=" : "",
                 c->w_off != 0 ? " w+1" : "");
        break;
    case OP_GEMM:
        snprintf(buf, n, "%s M=%lld N=%lld K=%lld bias=%d acc=%d lens=%s", op, (long long)c->M,
                 (long long)c->N, (long long)c->K, c->bias, c->acc, lens);
        break;
    case OP_QK_NORM_ROPE:
    case OP_ATTENTION:
    {
        char extra[64] = "";
        if (c->op == OP_QK_NORM_ROPE)
            snprintf(extra, sizeof extra, " norms=%d%s", c->norms, c->w_off != 0 ? " w+1" : "");
        else if (c->window || c->softcap != 0)
            snprintf(extra, sizeof extra, " window=%d softcap=%g", c->window, (double)c->softcap);
        snprintf(buf, n, "%s nh=%lld nkv=%lld hd=%lld%s lens=%s", op, (long long)c->nh,
                 (long long)c->nkv, (long long)c->hd, extra, lens);
        break;
    }
    case OP_GLU:
        snprintf(buf, n, "%s %s T=%lld ff=%lld", op, c->act == RL_ACT_GELU_TANH ? "gelu_tanh" : "silu",
                 (long long)c->n, (long long)c->d);
        break;
    case OP_CAST: snprintf(buf, n, "%s n=%lld res->act", op, (long long)c->n); break;
    case OP_POOL:
        snprintf(buf, n, "%s %s T=%lld d=%lld src=%s", op, pools[c->pool], (long long)c->n,
                 (long long)c->d, dt_name(c->src));
        break;
    case OP_UPLOAD:
        snprintf(buf, n, "%s n=%lld %s->%s", op, (long long)c->n, dt_name(c->src),
                 c->dst_f32 ? "f32" : "weight");
        break;
    case OP_DOWNLOAD: snprintf(buf, n, "%s n=%lld", op, (long long)c->n); break;
    case OP_DEQUANT:
        snprintf(buf, n, "%s %s%d %s%d%s%s%s scales=%s [%lld, %lld]", op,
                 c->qf == RL_QF_AWQ ? "awq" : c->qf == RL_QF_GPTQ ? "gptq" : "fp8 e4m3 ",
                 c->qf == RL_QF_FP8_BLOCK ? 8 : c->qbits,
                 c->qf == RL_QF_FP8_BLOCK ? "block" : "g", c->qgroup, c->qflags & QZ ? " zeros" : "", c->qflags & QG ? " g_idx" : "",
                 c->qflags & QV1 ? " v1" : "", dt_name(c->src), (long long)c->n, (long long)c->d);
        break;
    default: snprintf(buf, n, "%s", op); break;
    }
}

/* ---- comparison ---------------------------------------------------------- */

typedef struct {
    int failed;
    double worst;            /* largest err / bound of the checks so far (exact ones: 0)   */
    char line[320];          /* the worst (or first failing) check                        */
    char why[1024];          /* failure details                                           */
    int verbose;
} cres;

static void note(cres *r, int fail, double ratio, const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (r->verbose) printf("        %s %s\n", fail ? "FAIL" : "ok  ", buf);
    if (fail && !r->failed) {
        r->failed = 1;
        snprintf(r->line, sizeof r->line, "%s", buf);
    } else if (!r->failed && (ratio > r->worst || !r->line[0])) {
        r->worst = ratio;
        snprintf(r->line, sizeof r->line, "%s", buf);
    }
}

/* got vs ref by the normalised error; returns 1 when within the bound */
static int check(cres *r, const char *what, const float *got, const double *ref, size_t n, bound b)
{
    double ss = 0, se = 0, sr = 0;
    for (size_t i = 0; i < n; i++) ss += ref[i] * ref[i];
    double rms = n ? sqrt(ss / (double)n) : 0;
    if (rms == 0) rms = 1;
    double err = 0;
    size_t worst = 0, off = 0, nonfinite = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(ref[i])) { nonfinite++; continue; }
        double e = fabs((double)got[i] - ref[i]);
        se += e * e;
        sr += ref[i] * ref[i];
        double ne = b.rel == 0 ? (e != 0 ? INFINITY : 0)
                  : e / (b.tol ? b.tol[i] : fabs(ref[i]) + b.floor * rms);
        if (b.rel == 0 ? ne != 0 : ne > b.rel) off++;
        if (ne > err) { err = ne; worst = i; }
    }
    double nrm = sr > 0 ? sqrt(se / sr) : sqrt(se);
    int fail = nonfinite > 0 || off > 0 || (b.nrm > 0 && nrm > b.nrm);
    double ratio = b.rel == 0 ? 0 : err / b.rel;
    if (b.nrm > 0 && nrm / b.nrm > ratio) ratio = nrm / b.nrm;
    if (b.nrm > 0)
        note(r, fail, ratio, "%s: err %.2e / %.2e, nrm %.2e / %.2e", what, err, b.rel, nrm, b.nrm);
    else if (b.rel == 0)
        note(r, fail, ratio, "%s: exact", what);
    else
        note(r, fail, ratio, "%s: err %.2e / %.2e", what, err, b.rel);
    if (fail && !r->why[0]) {
        size_t i = worst;
        if (nonfinite) {
            for (i = 0; i < n && isfinite(got[i]) && isfinite(ref[i]); i++) {}
            snprintf(r->why, sizeof r->why,
                     "%s: %zu of %zu values non-finite, first at %zu: got %.9g ref %.9g", what,
                     nonfinite, n, i, (double)got[i], ref[i]);
        } else {
            snprintf(r->why, sizeof r->why,
                     "%s: %zu of %zu elements off; worst at %zu: got %.9g ref %.9g (ref rms "
                     "%.3g), normalised error %.3g, relative norm error %.3g", what, off, n, i,
                     (double)got[i], ref[i], rms, err, nrm);
        }
    }
    return !fail;
}

static int check_f(cres *r, const char *what, const float *got, const float *ref, size_t n, bound b)
{
    return check(r, what, got, widen(ref, n), n, b);
}

/* bitwise equality (NaN equals NaN) of two f32 arrays */
static int check_bits(cres *r, const char *what, const float *got, const float *want, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int same = isnan(got[i]) ? isnan(want[i]) : f2u(got[i]) == f2u(want[i]);
        if (!same) {
            note(r, 1, 0, "%s: not bit-exact", what);
            if (!r->why[0])
                snprintf(r->why, sizeof r->why, "%s: element %zu of %zu: got %.9g (0x%08x), want "
                         "%.9g (0x%08x)", what, i, n, (double)got[i], f2u(got[i]),
                         (double)want[i], f2u(want[i]));
            return 0;
        }
    }
    note(r, 0, 0, "%s: exact", what);
    return 1;
}

static void fail_msg(cres *r, const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    note(r, 1, 0, "%s", buf);
    if (!r->why[0]) snprintf(r->why, sizeof r->why, "%s", buf);
}

/* ---- the run context ---------------------------------------------------- */

typedef enum { TGT_CPU, TGT_BF16, TGT_BF16_FMA, TGT_F32, TGT_COUNT } tgt;

typedef struct {
    int cuda;      /* mode: 0 cpu (reference: double), 1 cuda (reference: the CPU op) */
    tgt target;
    tdev *dut;     /* backend under test                                             */
    tdev *cpu;     /* the CPU backend (the reference in cuda mode; == dut in cpu mode) */
    rng_t rng;
    cres *r;
} tctx;

/* the checks of a result: cpu mode against the double reference; cuda mode
 * against the CPU op (cpu_out), and in the fp32 mode against the double
 * reference too. `bf` is the bound of the target's storage mode. */
static void check_result(tctx *t, const char *what, const float *got, const float *cpu_out,
                         const double *ref, size_t n, bound bf)
{
    char buf[96];
    if (!t->cuda) {
        snprintf(buf, sizeof buf, "%s vs f64", what);
        check(t->r, buf, got, ref, n, bf);
        return;
    }
    snprintf(buf, sizeof buf, "%s vs cpu", what);
    check_f(t->r, buf, got, cpu_out, n, bf);
    if (t->target == TGT_F32) {
        snprintf(buf, sizeof buf, "%s vs f64", what);
        check(t->r, buf, got, ref, n, bf);
    }
}

/* storage rounding of inputs: what the backend under test stores */
static rl_dtype act_of(tctx *t) { return t->dut->be->act_dtype; }
static rl_dtype weight_of(tctx *t) { return t->dut->be->weight_dtype; }

/* the bound of an output: bf16 (a bf16 output of the bf16 mode) or f32 */
static bound out_bound(tctx *t, rl_dtype out_dt, bound cpu_b, bound bf16_b, bound cuda_f32_b)
{
    if (!t->cuda) return cpu_b;
    return out_dt == RL_BF16 ? bf16_b : cuda_f32_b;
}

static const bound F32_MODE = {F32_REL, F32_FLOOR, 0};

/* ---- ops: one run on a backend ------------------------------------------ */

static int run_embed(tdev *d, const int32_t *tok, int64_t T, const float *table, int64_t V,
                     int64_t dim, float scale, float *out)
{
    int32_t *tp;
    void *tb, *x;
    TRYI(d_put_i32(d, tok, (size_t)T, &tp));
    TRYI(d_put(d, table, (size_t)(V * dim), d->be->weight_dtype, &tb));
    TRYI(d_empty(d, (size_t)(T * dim), d->be->res_dtype, &x));
    TRY(d, d->be->embed(d->be, tp, T, tb, dim, x, scale));
    return d_get(d, x, (size_t)(T * dim), d->be->res_dtype, out);
}

static int case_embed(tctx *t, const tcase *c)
{
    const int64_t V = 1000, T = c->n, dim = c->d;
    int32_t *tok = halloc((size_t)T * 4);
    for (int64_t i = 0; i < T; i++) tok[i] = (int32_t)rng_int(&t->rng, V);
    tok[0] = 0;
    tok[T - 1] = (int32_t)(V - 1);
    float *table = normals(&t->rng, (size_t)(V * dim), 1, 0);
    round_to(table, (size_t)(V * dim), weight_of(t));
    float *got = hf((size_t)(T * dim)), *want = hf((size_t)(T * dim));
    const float scale = c->scale != 0 ? c->scale : 1.0f;
    TRYI(run_embed(t->dut, tok, T, table, V, dim, scale, got));
    /* one f32 product per element (scale 1: the row itself) */
    for (int64_t i = 0; i < T; i++)
        for (int64_t j = 0; j < dim; j++) want[i * dim + j] = table[tok[i] * dim + j] * scale;
    check_bits(t->r, "embed vs table rows * scale", got, want, (size_t)(T * dim));
    if (t->cuda) {
        float *cpu = hf((size_t)(T * dim));
        TRYI(run_embed(t->cpu, tok, T, table, V, dim, scale, cpu));
        check_bits(t->r, "embed vs cpu", got, cpu, (size_t)(T * dim));
    }
    return 0;
}

static int run_rmsnorm(tdev *d, const tcase *c, const float *x, const float *w, const float *y0,
                       float eps, float *out, rl_dtype *odt)
{
    const int64_t rows = c->n, dim = c->d;
    rl_dtype xdt = c->x_act ? d->be->act_dtype : d->be->res_dtype;
    *odt = c->out_res ? d->be->res_dtype : d->be->act_dtype;
    void *xp, *wp, *y;
    TRYI(d_put(d, x, (size_t)(rows * dim), xdt, &xp));
    TRYI(d_put(d, w, (size_t)dim, d->be->weight_dtype, &wp));
    if (c->accum) TRYI(d_put(d, y0, (size_t)(rows * dim), *odt, &y));
    else TRYI(d_empty(d, (size_t)(rows * dim), *odt, &y));
    TRY(d, d->be->rmsnorm(d->be, xp, xdt, wp, y, *odt, rows, dim, eps, c->w_off, c->accum));
    return d_get(d, y, (size_t)(rows * dim), *odt, out);
}

static int case_rmsnorm(tctx *t, const tcase *c)
{
    const int64_t rows = c->n, dim = c->d, n = rows * dim;
    const float eps = 1e-6f;
    float *x = normals(&t->rng, (size_t)n, 1, 0);
    for (int64_t r = 0; r < rows; r++) { /* rows of very different scales */
        float s = (float)(0.1 + 9.9 * rng_unif(&t->rng));
        for (int64_t i = 0; i < dim; i++) x[r * dim + i] *= s;
    }
    if (c->x_act) round_to(x, (size_t)n, act_of(t));
    /* Gemma's stored w is near 0 (applied as 1 + w), Llama's near 1 */
    float *w = normals(&t->rng, (size_t)dim, 0.3, c->w_off != 0 ? 0 : 1);
    round_to(w, (size_t)dim, weight_of(t));
    float *y0 = normals(&t->rng, (size_t)n, 1, 0);   /* the residual a post-norm adds to */
    double *ref = hd((size_t)n);
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0;
        for (int64_t i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
        double inv = 1 / sqrt(ss / (double)dim + (double)eps);
        for (int64_t i = 0; i < dim; i++)
            ref[r * dim + i] = ((double)c->w_off + w[i]) * x[r * dim + i] * inv +
                               (c->accum ? y0[r * dim + i] : 0);
    }
    float *got = hf((size_t)n), *cpu = NULL;
    rl_dtype odt, cdt;
    TRYI(run_rmsnorm(t->dut, c, x, w, y0, eps, got, &odt));
    if (t->cuda) TRYI(run_rmsnorm(t->cpu, c, x, w, y0, eps, cpu = hf((size_t)n), &cdt));
    /* cpu: ~4 f32 roundings (sqrtf, the division, two products); accumulated
     * into a residual of unit scale, relative to that scale where they cancel */
    const double fl = c->accum ? F32_FLOOR : SMALL_FLOOR;
    const bound cpu_b = {2e-6, fl, 0}, bf_b = {BF16_EPS, fl, 0}, f32_b = {1e-5, fl, 0};
    check_result(t, "rmsnorm", got, cpu, ref, (size_t)n, out_bound(t, odt, cpu_b, bf_b, f32_b));
    return 0;
}

static int run_gemm(tdev *d, const int *lens, int nl, const float *x, const float *w,
                    const float *bias, const float *y0, int64_t M, int64_t N, int64_t K, int acc,
                    float *out, rl_dtype *ydt)
{
    tseg s;
    TRYI(d_segments(d, lens, nl, &s));
    *ydt = acc ? d->be->res_dtype : d->be->act_dtype;
    void *xp, *wp, *bp = NULL, *y;
    TRYI(d_put(d, x, (size_t)(M * K), d->be->act_dtype, &xp));
    if (d->be->gemm_pack_rows) {   /* the weight in the backend's GEMM layout, in two pieces */
        size_t n = rl_gemm_weight_elems(rl_backend_gemm_row_align(d->be), N, K);
        TRYI(d_alloc(d, n * rl_dtype_size(d->be->weight_dtype), &wp));
        TRY(d, d->be->gemm_pack_rows(d->be, wp, N, K, N / 2, w + N / 2 * K, RL_F32, N - N / 2));
        TRY(d, d->be->gemm_pack_rows(d->be, wp, N, K, 0, w, RL_F32, N / 2));
    } else {
        TRYI(d_put(d, w, (size_t)(N * K), d->be->weight_dtype, &wp));
    }
    if (bias) TRYI(d_put(d, bias, (size_t)N, d->be->weight_dtype, &bp));
    if (acc) TRYI(d_put(d, y0, (size_t)(M * N), *ydt, &y));
    else TRYI(d_empty(d, (size_t)(M * N), *ydt, &y));
    TRY(d, d->be->gemm(d->be, &s.seg, xp, wp, bp, y, M, N, K, acc));
    return d_get(d, y, (size_t)(M * N), *ydt, out);
}

static int case_gemm(tctx *t, const tcase *c)
{
    const int64_t M = c->M, N = c->N, K = c->K;
    const int nl = n_lens(c->lens);
    float *x = normals(&t->rng, (size_t)(M * K), 1, 0);
    float *w = normals(&t->rng, (size_t)(N * K), 1 / sqrt((double)K), 0);
    float *bias = c->bias ? normals(&t->rng, (size_t)N, 1, 0) : NULL;
    float *y0 = normals(&t->rng, (size_t)(M * N), 1, 0);
    round_to(x, (size_t)(M * K), act_of(t));
    round_to(w, (size_t)(N * K), weight_of(t));
    if (bias) round_to(bias, (size_t)N, weight_of(t));
    double *ref = hd((size_t)(M * N));
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++) s += (double)x[i * K + k] * w[j * K + k];
            ref[i * N + j] = s + (bias ? bias[j] : 0) + (c->acc ? y0[i * N + j] : 0);
        }
    float *got = hf((size_t)(M * N)), *cpu = NULL;
    rl_dtype ydt, cdt;
    TRYI(run_gemm(t->dut, c->lens, nl, x, w, bias, y0, M, N, K, c->acc, got, &ydt));
    if (t->cuda)
        TRYI(run_gemm(t->cpu, c->lens, nl, x, w, bias, y0, M, N, K, c->acc,
                      cpu = hf((size_t)(M * N)), &cdt));
    /* cpu: f32 sums of K products (random signs: ~sqrt(K) ulps of the
     * output's scale); cuda bf16 accumulate=1: f32 output, summation order */
    const bound cpu_b = {1e-5, F32_FLOOR, 0}, bf_b = {BF16_EPS, SMALL_FLOOR, 0},
                acc_b = {1e-3, SMALL_FLOOR, 0};
    bound b = out_bound(t, ydt, cpu_b, bf_b, t->target == TGT_F32 ? F32_MODE : acc_b);
    check_result(t, "gemm", got, cpu, ref, (size_t)(M * N), b);
    if (!t->cuda && nl > 1) { /* packing is bitwise neutral on the CPU */
        float *alone = hf((size_t)(M * N));
        int64_t r0 = 0;
        for (int s = 0; s < nl; s++) {
            int64_t m = c->lens[s];
            rl_dtype dt;
            TRYI(run_gemm(t->dut, &c->lens[s], 1, x + r0 * K, w, bias, y0 + r0 * N, m, N, K,
                          c->acc, alone + r0 * N, &dt));
            d_release(t->dut);
            r0 += m;
        }
        check_bits(t->r, "gemm packed vs alone", got, alone, (size_t)(M * N));
    }
    return 0;
}

static float *rope_inv_freq(int64_t hd, double theta)
{
    float *inv = hf((size_t)(hd / 2));
    for (int64_t i = 0; i < hd / 2; i++) inv[i] = (float)(1.0 / pow(theta, (double)(2 * i) / (double)hd));
    return inv;
}

static int run_qk(tdev *d, const tcase *c, const int *lens, int nl, const float *qkv,
                  const float *qn, const float *kn, float eps, const float *inv, float *out)
{
    const int64_t nh = c->nh, nkv = c->nkv, hdim = c->hd;
    const int proj = c->norms == RL_QK_NORM_PROJ;
    tseg s;
    TRYI(d_segments(d, lens, nl, &s));
    const int64_t W = (nh + 2 * nkv) * hdim;
    void *p, *qp = NULL, *kp = NULL, *ip;
    TRYI(d_put(d, qkv, (size_t)(s.T * W), d->be->act_dtype, &p));
    if (qn) TRYI(d_put(d, qn, (size_t)(proj ? nh * hdim : hdim), d->be->weight_dtype, &qp));
    if (kn) TRYI(d_put(d, kn, (size_t)(proj ? nkv * hdim : hdim), d->be->weight_dtype, &kp));
    TRYI(d_put(d, inv, (size_t)(hdim / 2), RL_F32, &ip));
    TRY(d, d->be->qk_norm_rope(d->be, &s.seg, p, s.T, nh, nkv, hdim, qp, kp, c->norms, c->w_off,
                              eps, ip));
    return d_get(d, p, (size_t)(s.T * W), d->be->act_dtype, out);
}

static int case_qk(tctx *t, const tcase *c)
{
    const int nl = n_lens(c->lens);
    const int64_t nh = c->nh, nkv = c->nkv, hdim = c->hd, half = hdim / 2;
    const int64_t W = (nh + 2 * nkv) * hdim;
    int64_t T = 0;
    for (int i = 0; i < nl; i++) T += c->lens[i];
    const size_t n = (size_t)(T * W);
    const float eps = 1e-6f;
    float *qkv = normals(&t->rng, n, 1, 0);
    round_to(qkv, n, act_of(t));
    float *qn = NULL, *kn = NULL;
    const int proj = c->norms == RL_QK_NORM_PROJ;
    const int64_t nq = proj ? nh * hdim : hdim, nk = proj ? nkv * hdim : hdim;
    if (c->norms) {
        qn = normals(&t->rng, (size_t)nq, 0.3, c->w_off != 0 ? 0 : 1);
        kn = normals(&t->rng, (size_t)nk, 0.3, c->w_off != 0 ? 0 : 1);
        round_to(qn, (size_t)nq, weight_of(t));
        round_to(kn, (size_t)nk, weight_of(t));
    }
    float *inv = rope_inv_freq(hdim, 10000.0);
    /* reference: RMSNorm (per head, or over the whole q / k row first), then
     * rotate_half RoPE at the angle (float)pos * inv_freq rounded to f32 as
     * HF computes it */
    double *ref = widen(qkv, n), *y = hd((size_t)hdim);
    for (int s = 0, t0 = 0; s < nl; t0 += c->lens[s], s++)
        for (int p = 0; p < c->lens[s]; p++) {
            double *row = ref + (int64_t)(t0 + p) * W;
            if (proj)
                for (int part = 0; part < 2; part++) {
                    double *x = row + (part ? nh * hdim : 0), ss = 0;
                    const int64_t len = part ? nkv * hdim : nh * hdim;
                    const float *nw = part ? kn : qn;
                    for (int64_t i = 0; i < len; i++) ss += x[i] * x[i];
                    double inv_rms = 1 / sqrt(ss / (double)len + (double)eps);
                    for (int64_t i = 0; i < len; i++) x[i] = ((double)c->w_off + nw[i]) * x[i] * inv_rms;
                }
            for (int64_t h = 0; h < nh + nkv; h++) {
                double *x = row + h * hdim;
                const float *nw = proj ? NULL : h < nh ? qn : kn;
                double inv_rms = 1;
                if (nw) {
                    double ss = 0;
                    for (int64_t i = 0; i < hdim; i++) ss += x[i] * x[i];
                    inv_rms = 1 / sqrt(ss / (double)hdim + (double)eps);
                }
                for (int64_t i = 0; i < hdim; i++)
                    y[i] = nw ? ((double)c->w_off + nw[i]) * x[i] * inv_rms : x[i];
                for (int64_t i = 0; i < half; i++) {
                    double a = (double)((float)p * inv[i]), cs = cos(a), sn = sin(a);
                    x[i] = y[i] * cs - y[i + half] * sn;
                    x[i + half] = y[i + half] * cs + y[i] * sn;
                }
            }
        }
    float *got = hf(n), *cpu = NULL;
    TRYI(run_qk(t->dut, c, c->lens, nl, qkv, qn, kn, eps, inv, got));
    if (t->cuda) TRYI(run_qk(t->cpu, c, c->lens, nl, qkv, qn, kn, eps, inv, cpu = hf(n)));
    /* v (the last 2nkv.. columns: nkv heads) is not touched */
    const int64_t v0 = (nh + nkv) * hdim;
    float *gv = hf((size_t)T * (size_t)(W - v0)), *iv = hf((size_t)T * (size_t)(W - v0));
    for (int64_t r = 0; r < T; r++) {
        memcpy(gv + r * (W - v0), got + r * W + v0, (size_t)(W - v0) * 4);
        memcpy(iv + r * (W - v0), qkv + r * W + v0, (size_t)(W - v0) * 4);
    }
    check_bits(t->r, "v untouched", gv, iv, (size_t)(T * (W - v0)));
    /* cpu: cosf/sinf and a few products, relative to the head's scale */
    const bound cpu_b = {1e-5, F32_FLOOR, 0}, bf_b = {2 * BF16_EPS, SMALL_FLOOR, 0};
    check_result(t, "qk_norm_rope", got, cpu, ref, n, out_bound(t, act_of(t), cpu_b, bf_b, F32_MODE));
    if (!t->cuda && nl > 1) {
        float *alone = hf(n);
        int64_t r0 = 0;
        for (int s = 0; s < nl; s++) {
            TRYI(run_qk(t->dut, c, &c->lens[s], 1, qkv + r0 * W, qn, kn, eps, inv, alone + r0 * W));
            d_release(t->dut);
            r0 += c->lens[s];
        }
        check_bits(t->r, "qk_norm_rope packed vs alone", got, alone, n);
    }
    return 0;
}

static int run_attention(tdev *d, const tcase *c, const int *lens, int nl, const float *qkv,
                         float scale, float *out, rl_status *refused)
{
    const int64_t nh = c->nh, nkv = c->nkv, hdim = c->hd;
    tseg s;
    TRYI(d_segments(d, lens, nl, &s));
    const int64_t W = (nh + 2 * nkv) * hdim;
    void *p, *o;
    TRYI(d_put(d, qkv, (size_t)(s.T * W), d->be->act_dtype, &p));
    TRYI(d_empty(d, (size_t)(s.T * nh * hdim), d->be->act_dtype, &o));
    rl_status st = d->be->attention(d->be, &s.seg, p, o, s.T, nh, nkv, hdim, scale, c->window,
                                    c->softcap);
    if (refused) { /* a case that expects a refusal reads no output */
        *refused = st;
        if (st != RL_OK || !out) return 0;
    }
    TRY(d, st);
    return d_get(d, o, (size_t)(s.T * nh * hdim), d->be->act_dtype, out);
}

static int case_attention(tctx *t, const tcase *c)
{
    const int nl = n_lens(c->lens);
    const int64_t nh = c->nh, nkv = c->nkv, hdim = c->hd, W = (nh + 2 * nkv) * hdim;
    const int64_t group = nh / nkv, Wo = nh * hdim;
    int64_t T = 0, mx = 0;
    for (int i = 0; i < nl; i++) { T += c->lens[i]; if (c->lens[i] > mx) mx = c->lens[i]; }
    const size_t n = (size_t)(T * W), no = (size_t)(T * Wo);
    const float scale = (float)(1 / sqrt((double)hdim));
    float *qkv = normals(&t->rng, n, 1, 0);
    for (int64_t r = 0; r < T; r++) /* q x3: a sharper softmax than unit scores */
        for (int64_t i = 0; i < nh * hdim; i++) qkv[r * W + i] *= 3;
    round_to(qkv, n, act_of(t));
    if (t->cuda && c->cuda_refuses) {
        rl_status st = RL_OK;
        TRYI(run_attention(t->dut, c, c->lens, nl, qkv, scale, NULL, &st));
        char want[32];
        snprintf(want, sizeof want, "head_dim %lld", (long long)hdim);
        if (st == RL_ERR_INVALID && strstr(rl_last_error(), want))
            note(t->r, 0, 0, "refused: %.200s", rl_last_error());
        else if (st == RL_OK)
            fail_msg(t->r, "expected RL_ERR_INVALID naming \"%s\"; the attention ran", want);
        else
            fail_msg(t->r, "expected RL_ERR_INVALID naming \"%s\", got status %d: %s", want,
                     (int)st, rl_last_error());
        return 0;
    }
    /* tol, var, det2: the error model of the tensor-core kernel (at its bound below) */
    double *ref = hd(no), *sc = hd((size_t)mx), *eta = hd((size_t)mx), *tol = hd(no);
    double var = 0, det2 = 0, ref2 = 0;
    const int model = t->cuda && t->target == TGT_BF16; /* the only target it bounds */
    for (int s = 0, r0 = 0; s < nl; r0 += c->lens[s], s++)
        for (int64_t h = 0; h < nh; h++) {
            const int64_t kh = h / group;
            for (int i = 0; i < c->lens[s]; i++) {
                const float *q = qkv + (int64_t)(r0 + i) * W + h * hdim;
                double m = -INFINITY, sum = 0;
                /* keys i - window < j <= i (HF's sliding window) */
                const int j0 = c->window > 0 && i - c->window + 1 > 0 ? i - c->window + 1 : 0;
                for (int j = j0; j <= i; j++) {
                    const float *k = qkv + (int64_t)(r0 + j) * W + (nh + kh) * hdim;
                    double dot = 0, mag = 0;
                    for (int64_t e = 0; e < hdim; e++) {
                        dot += (double)q[e] * k[e];
                        mag += fabs((double)q[e] * k[e]);
                    }
                    sc[j] = dot * scale;
                    double slope = 1; /* d logit / d (scaled dot): the soft-cap's sech^2 */
                    if (c->softcap > 0) {
                        const double th = tanh(sc[j] / c->softcap);
                        sc[j] = c->softcap * th;
                        slope = 1 - th * th;
                    }
                    /* f32 sum of hd exact products (a unit of 2^-23 per add: tensor
                       cores may truncate), through the cap; then the f32 roundings of
                       the logit (scale, tanh, base 2) */
                    eta[j] = slope * scale * (double)hdim * 0x1p-23 * mag + 0x1p-21 * fabs(sc[j]);
                    if (sc[j] > m) m = sc[j];
                }
                for (int j = j0; j <= i; j++) sum += (sc[j] = exp(sc[j] - m));
                double *o = ref + (int64_t)(r0 + i) * Wo + h * hdim;
                for (int64_t e = 0; e < hdim; e++) o[e] = 0;
                for (int j = j0; j <= i; j++) {
                    const float *v = qkv + (int64_t)(r0 + j) * W + (nh + nkv + kh) * hdim;
                    for (int64_t e = 0; e < hdim; e++) o[e] += sc[j] / sum * v[e];
                }
                /* f32 sums over the row's keys (l and P V, and the rescales) */
                const double gam = (double)(i - j0 + 1) * 0x1p-23;
                for (int64_t e = 0; model && e < hdim; e++) {
                    double mass = 0, sq = 0, score = 0; /* sum p|v|, sum (p v)^2, score terms */
                    for (int j = j0; j <= i; j++) {
                        const double p = sc[j] / sum;
                        const double v = qkv[(int64_t)(r0 + j) * W + (nh + nkv + kh) * hdim + e];
                        mass += p * fabs(v);
                        sq += p * v * p * v;
                        /* exp2f(s - m): the subtraction and 2 ulp */
                        score += p * (eta[j] + 0x1p-21 * (fabs(m) + 1)) * fabs(v - o[e]);
                    }
                    const double oe = fabs(o[e]), det = 2 * score + 2 * gam * (mass + oe);
                    tol[(int64_t)(r0 + i) * Wo + h * hdim + e] =
                        BF16_EPS * (mass + oe) + det + 0x1p-23 * oe + 1e-30;
                    var += BF16_EPS * BF16_EPS / 3 * (sq + oe * oe);
                    det2 += det * det;
                    ref2 += oe * oe;
                }
            }
        }
    float *got = hf(no), *cpu = NULL;
    TRYI(run_attention(t->dut, c, c->lens, nl, qkv, scale, got, NULL));
    if (t->cuda) TRYI(run_attention(t->cpu, c, c->lens, nl, qkv, scale, cpu = hf(no), NULL));
    /* cpu: sgemm scores (|s| up to ~10 here, so ~1e-6 absolute), expf, f32
     * sums; relative to the output's scale (measured <= 1.4e-5 at hd 256).
     * mma: an error model of the kernel against the CPU op, per output element
     * o = sum_j p_j v_j / l (p_j = exp(s_j - m), l = sum_j p_j), u = 2^-8 (bf16):
     * - P is rounded to bf16 for P V (l sums the f32 p): |dp_j| <= u p_j, so
     *   |do| <= u sum_j p_j |v_j| / l, the mass of |v| (not |o|: a flat softmax,
     *   as under a binding soft-cap, gives |o| << mass);
     * - the output is rounded to bf16: u |o|;
     * - a logit error eta_j changes p_j by a factor (1 + eta_j), so o by
     *   sum_j p_j eta_j |v_j - o| / l; eta_j: the f32 dot of hd products
     *   (hd 2^-23 sum_e |q_e k_e| scale) times the soft-cap's derivative
     *   sech^2(s / cap), plus a few f32 roundings of the logit and exp2f's
     *   2 ulp (2^-21 (|s_j| + |m| + 1)); counted twice: the CPU op has its own;
     * - the length: f32 sums over the row's n keys (l, P V, the online
     *   rescales), n 2^-23 (mass + |o|), twice (both backends), and the CPU's
     *   f32 output, 2^-23 |o|.
     * Each element within that sum (a worst case: rounding errors never all
     * align, so the measured ratio stays well below 1); and the norm of the
     * error within twice its expectation, the rounding errors of P and of the
     * output being independent with a variance <= u^2 / 3 each:
     * E ||err||^2 <= u^2 / 3 sum (sum_j (p_j v_j / l)^2 + o^2), plus the
     * worst-case norm of the other terms. */
    const bound cpu_b = {5e-5, F32_FLOOR, 0, NULL}, fma_b = {2 * BF16_EPS, SMALL_FLOOR, 0, NULL},
                mma_b = {1, 0, ref2 > 0 ? (2 * sqrt(var) + sqrt(det2)) / sqrt(ref2) : 1, tol};
    bound b = !t->cuda ? cpu_b : t->target == TGT_F32 ? F32_MODE
              : t->target == TGT_BF16_FMA ? fma_b : mma_b;
    check_result(t, "attention", got, cpu, ref, no, b);
    if (!t->cuda && nl > 1) {
        float *alone = hf(no);
        int64_t r0 = 0;
        for (int s = 0; s < nl; s++) {
            TRYI(run_attention(t->dut, c, &c->lens[s], 1, qkv + r0 * W, scale, alone + r0 * Wo,
                               NULL));
            d_release(t->dut);
            r0 += c->lens[s];
        }
        check_bits(t->r, "attention packed vs alone", got, alone, no);
    }
    return 0;
}

static int run_glu(tdev *d, const float *gu, int64_t T, int64_t ff, int act, float *out)
{
    void *p, *o;
    TRYI(d_put(d, gu, (size_t)(T * 2 * ff), d->be->act_dtype, &p));
    TRYI(d_empty(d, (size_t)(T * ff), d->be->act_dtype, &o));
    TRY(d, d->be->glu(d->be, p, o, T, ff, act));
    return d_get(d, o, (size_t)(T * ff), d->be->act_dtype, out);
}

static int case_glu(tctx *t, const tcase *c)
{
    const int64_t T = c->n, ff = c->d;
    const size_t n = (size_t)(T * ff);
    float *gu = normals(&t->rng, 2 * n, 2, 0);
    round_to(gu, 2 * n, act_of(t));
    double *ref = hd(n);
    for (int64_t r = 0; r < T; r++)
        for (int64_t i = 0; i < ff; i++) {
            double g = gu[r * 2 * ff + i], u = gu[r * 2 * ff + ff + i];
            double a = c->act == RL_ACT_GELU_TANH
                     ? 0.5 * g * (1 + tanh(sqrt(2 / 3.141592653589793) * (g + 0.044715 * g * g * g)))
                     : g / (1 + exp(-g));
            ref[r * ff + i] = a * u;
        }
    float *got = hf(n), *cpu = NULL;
    TRYI(run_glu(t->dut, gu, T, ff, c->act, got));
    if (t->cuda) TRYI(run_glu(t->cpu, gu, T, ff, c->act, cpu = hf(n)));
    /* gelu_tanh's 1 + tanh(..) cancels for very negative g (as in torch's
     * float formula): relative to the output's scale there */
    const double fl = c->act == RL_ACT_GELU_TANH ? F32_FLOOR : SMALL_FLOOR;
    const bound cpu_b = {2e-6, fl, 0}, bf_b = {BF16_EPS, fl, 0};
    check_result(t, "glu", got, cpu, ref, n, out_bound(t, act_of(t), cpu_b, bf_b, F32_MODE));
    return 0;
}

static int case_cast(tctx *t, const tcase *c)
{
    tdev *d = t->dut;
    const size_t n = (size_t)c->n, pad = 3;
    float *x = normals(&t->rng, n, 3, 0);
    void *src, *dst;
    TRYI(d_put(d, x, n, d->be->res_dtype, &src));
    TRYI(d_empty(d, n + pad, d->be->act_dtype, &dst));
    TRY(d, d->be->cast(d->be, src, d->be->res_dtype, dst, d->be->act_dtype, (int64_t)n));
    float *got = hf(n + pad), *want = hf(n + pad);
    TRYI(d_get(d, dst, n + pad, d->be->act_dtype, got));
    for (size_t i = 0; i < n + pad; i++)
        want[i] = i >= n ? NAN : act_of(t) == RL_BF16 ? bf16_round(x[i]) : x[i];
    check_bits(t->r, act_of(t) == RL_BF16 ? "cast: bf16 rounding, nothing past n"
                                          : "cast: exact, nothing past n", got, want, n + pad);
    return 0;
}

static int run_pool(tdev *d, const float *x, rl_dtype src, int64_t T, int64_t dim,
                    const int32_t *spans, int64_t S, rl_pool mode, float *out)
{
    void *xp, *o;
    int32_t *sp;
    TRYI(d_put(d, x, (size_t)(T * dim), src, &xp));
    TRYI(d_put_i32(d, spans, (size_t)(2 * S), &sp));
    TRYI(d_empty(d, (size_t)(S * dim), RL_F32, &o));
    TRY(d, d->be->pool(d->be, xp, src, dim, sp, S, mode, o));
    return d_get(d, o, (size_t)(S * dim), RL_F32, out);
}

static int case_pool(tctx *t, const tcase *c)
{
    const int64_t T = c->n, dim = c->d;
    static const int32_t spans[] = {0, 1, 0, 300, 5, 6, 10, 250, 299, 300, 17, 40};
    const int64_t S = (int64_t)(sizeof spans / sizeof spans[0] / 2);
    float *x = normals(&t->rng, (size_t)(T * dim), 1, 0.25);
    round_to(x, (size_t)(T * dim), c->src);
    double *ref = hd((size_t)(S * dim));
    for (int64_t s = 0; s < S; s++) {
        int64_t lo = spans[2 * s], hi = spans[2 * s + 1];
        for (int64_t i = 0; i < dim; i++) {
            double acc = 0;
            if (c->pool == RL_POOL_FIRST) acc = x[lo * dim + i];
            else if (c->pool == RL_POOL_LAST) acc = x[(hi - 1) * dim + i];
            else if (c->pool == RL_POOL_MAX) {
                acc = -INFINITY;
                for (int64_t r = lo; r < hi; r++) acc = fmax(acc, x[r * dim + i]);
            } else {
                for (int64_t r = lo; r < hi; r++) acc += x[r * dim + i];
                acc /= (double)(hi - lo);
            }
            ref[s * dim + i] = acc;
        }
    }
    float *got = hf((size_t)(S * dim));
    TRYI(run_pool(t->dut, x, c->src, T, dim, spans, S, c->pool, got));
    /* first / last / max select rows or elements exactly; mean: both backends sum
     * in double in row order and round once, so cuda gives the cpu op's bits and
     * both are within one f32 rounding (2^-24) of the double reference */
    const bound mean_b = {1e-6, SMALL_FLOOR, 0};
    bound b = c->pool != RL_POOL_MEAN ? EXACT : mean_b;
    if (t->cuda && c->src == RL_F32) {
        float *cpu = hf((size_t)(S * dim));
        TRYI(run_pool(t->cpu, x, c->src, T, dim, spans, S, c->pool, cpu));
        check_bits(t->r, "pool vs cpu", got, cpu, (size_t)(S * dim));
    }
    check(t->r, "pool vs f64", got, ref, (size_t)(S * dim), b); /* (the only reference for bf16) */
    if (c->pool == RL_POOL_MAX) {
        /* a NaN in row 20, column 3 propagates (as np.max does) into exactly the spans
         * holding row 20; every other element keeps its bits */
        const int64_t row = 20, col = 3;
        x[row * dim + col] = NAN;
        float *nan_got = hf((size_t)(S * dim));
        TRYI(run_pool(t->dut, x, c->src, T, dim, spans, S, c->pool, nan_got));
        for (int64_t s = 0; s < S; s++)
            if (spans[2 * s] <= row && row < spans[2 * s + 1]) got[s * dim + col] = NAN;
        check_bits(t->r, "max: a NaN propagates to its spans only", nan_got, got,
                   (size_t)(S * dim));
    }
    return 0;
}

/* src values of dtype `src` (n elements, random bits plus specials), their
 * exact f32 values in *exact */
static void *upload_source(rng_t *r, size_t n, rl_dtype src, float **exact)
{
    float *e = hf(n);
    if (src == RL_F32) {
        float *s = hf(n);
        for (size_t i = 0; i < n; i++)
            s[i] = i % 4 == 3 ? u2f((uint32_t)rng_u64(r)) : (float)(rng_normal(r) * 3.0);
        static const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, FLT_MAX,
                                         0x1p-149f, 1.00390625f /* 1 + 2^-8: tie, to even */,
                                         1.01171875f /* 1 + 3 * 2^-8: tie, up */};
        for (size_t i = 0; i < sizeof specials / sizeof specials[0] && i < n; i++) s[i] = specials[i];
        memcpy(e, s, n * 4);
        *exact = e;
        return s;
    }
    uint16_t *h = halloc(n * 2);
    for (size_t i = 0; i < n; i++) {
        h[i] = (uint16_t)rng_u64(r);
        e[i] = src == RL_F16 ? f16_decode(h[i]) : bf16_decode(h[i]);
    }
    *exact = e;
    return h;
}

static int case_upload(tctx *t, const tcase *c)
{
    tdev *d = t->dut;
    const size_t n = (size_t)c->n, off = 3, pad = 5, all = off + n + pad;
    const rl_dtype dst = c->dst_f32 ? RL_F32 : d->be->weight_dtype;
    float *exact;
    const void *src = upload_source(&t->rng, n, c->src, &exact);
    void *p;
    TRYI(d_empty(d, all, dst, &p));
    TRY(d, d->be->upload(d->be, p, dst, off, src, c->src, n));
    float *got = hf(all), *want = hf(all);
    TRYI(d_get(d, p, all, dst, got));
    for (size_t i = 0; i < all; i++) want[i] = NAN; /* before the offset, after the end */
    for (size_t i = 0; i < n; i++) want[off + i] = dst == RL_BF16 ? bf16_round(exact[i]) : exact[i];
    check_bits(t->r, dst == RL_BF16 ? "bf16 rounding (ties to even), neighbours untouched"
                                    : "exact, neighbours untouched", got, want, all);
    return 0;
}

static int case_download(tctx *t, const tcase *c)
{
    tdev *d = t->dut;
    const size_t n = (size_t)c->n, guard = 4;
    float *x = normals(&t->rng, n, 1, 0), *out = hf(n + guard);
    void *p;
    TRYI(d_put(d, x, n, RL_F32, &p));
    for (size_t i = 0; i < n + guard; i++) out[i] = -7.0f;
    TRY(d, d->be->download_f32(d->be, out, p, n));
    check_bits(t->r, "download", out, x, n);
    float *g = out + n, seven[4] = {-7.0f, -7.0f, -7.0f, -7.0f};
    check_bits(t->r, "nothing written past n", g, seven, guard);
    /* from an interior element, and n = 0 writes nothing */
    if (n > 1) {
        for (size_t i = 0; i < n; i++) out[i] = -7.0f;
        TRY(d, d->be->download_f32(d->be, out, (const float *)p + 1, n - 1));
        check_bits(t->r, "download at an offset", out, x + 1, n - 1);
    }
    out[0] = -7.0f;
    TRY(d, d->be->download_f32(d->be, out, p, 0));
    check_bits(t->r, "n = 0 writes nothing", out, seven, 1);
    TRY(d, d->be->sync(d->be));
    /* enqueued (what a forward does with its pooled rows), there after sync */
    for (size_t i = 0; i < n + guard; i++) out[i] = -7.0f;
    TRY(d, d->be->download_f32_async(d->be, out, p, n));
    TRY(d, d->be->sync(d->be));
    check_bits(t->r, "download_async + sync", out, x, n);
    check_bits(t->r, "download_async: nothing written past n", g, seven, guard);
    return 0;
}

static int case_backend(tctx *t, const tcase *c)
{
    rl_backend *be = t->dut->be;
    rl_dtype want = t->target == TGT_BF16 || t->target == TGT_BF16_FMA ? RL_BF16 : RL_F32;
    if (be->weight_dtype == want && be->act_dtype == want && be->res_dtype == RL_F32)
        note(t->r, 0, 0, "weight/act/res %s/%s/%s", dt_name(be->weight_dtype),
             dt_name(be->act_dtype), dt_name(be->res_dtype));
    else
        fail_msg(t->r, "storage dtypes weight/act/res %s/%s/%s, want %s/%s/f32",
                 dt_name(be->weight_dtype), dt_name(be->act_dtype), dt_name(be->res_dtype),
                 dt_name(want), dt_name(want));
    if (!be->name || !be->kernel || !be->kernel[0])
        fail_msg(t->r, "name / kernel identity missing");
    else if (strncmp(be->name, t->cuda ? "cuda:" : "cpu", t->cuda ? 5 : 3) != 0)
        fail_msg(t->r, "name \"%s\"", be->name);
    else
        note(t->r, 0, 0, "%s: %s", be->name, be->kernel);
    if (t->cuda) { /* only bf16 and f32 storage exist */
        static rl_backend sentinel; /* must be overwritten with NULL */
        rl_backend *b16 = &sentinel;
        rl_status st = rl_backend_cuda_create_ex(0, RL_F16, &b16);
        if (st == RL_ERR_INVALID && b16 == NULL && strstr(rl_last_error(), "bf16 or f32"))
            note(t->r, 0, 0, "create_ex(RL_F16) refused");
        else {
            fail_msg(t->r, "rl_backend_cuda_create_ex(0, RL_F16) gave status %d: %s", (int)st,
                     rl_last_error());
            if (st == RL_OK && b16) b16->destroy(b16);
        }
    }
    return 0;
}

static int case_memory(tctx *t, const tcase *c)
{
    tdev *d = t->dut;
    rl_backend *be = d->be;
    void *p;
    TRYI(d_alloc(d, 1 << 20, &p));
    if (be->is_resident(be, p) != 1) fail_msg(t->r, "is_resident(alloc'ed buffer) != 1");
    size_t fr = 1, tot = 1;
    TRY(d, be->mem_info(be, &fr, &tot));
    if (t->cuda ? !(fr > 0 && fr <= tot) : !(fr == 0 && tot == 0))
        fail_msg(t->r, "mem_info free %zu total %zu", fr, tot);
    void *h = NULL;
    TRY(d, be->host_alloc(be, &h, 4096));
    if (!h) { fail_msg(t->r, "host_alloc gave NULL"); return 0; }
    memset(h, 0x5A, 4096); /* writable host memory */
    if (t->cuda) {
        int stack_word = 0;
        if (be->is_resident(be, h) != 0) fail_msg(t->r, "is_resident(host_alloc'ed) != 0");
        if (be->is_resident(be, &stack_word) != 0) fail_msg(t->r, "is_resident(stack) != 0");
    }
    be->host_release(h); /* needs no backend */
    if (!t->r->failed) note(t->r, 0, 0, "alloc, is_resident, mem_info %zu/%zu, host_alloc/release", fr, tot);
    return 0;
}

/* random valid parts of a quantized weight (quant_hf.h's layouts) */
static void *rand_words(rng_t *r, size_t words)
{
    uint32_t *w = halloc(words * 4);
    for (size_t i = 0; i < words; i++) w[i] = (uint32_t)rng_u64(r);
    return w;
}

static void *rand_scales(rng_t *r, size_t n, rl_dtype dt)
{
    unsigned char *p = halloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        float v = (float)(0.01 * rng_normal(r));
        uint32_t u = f2u(v);
        if (dt == RL_F32) memcpy(p + 4 * i, &u, 4);
        else if (dt == RL_BF16) {
            uint16_t h = (uint16_t)(f2u(bf16_round(v)) >> 16);
            memcpy(p + 2 * i, &h, 2);
        } else {   /* f16: a normal value, 10 random mantissa bits */
            uint16_t h = (uint16_t)((rng_u64(r) & 0x83FFu) | (uint16_t)(8 + rng_int(r, 8)) << 10);
            memcpy(p + 2 * i, &h, 2);
        }
    }
    return p;
}

/* the descriptor's parts copied into device memory (words; a tail padded) */
static int d_put_parts(tdev *d, const rl_qtensor *host, rl_qtensor *dev)
{
    *dev = *host;
    for (int i = 0; i < RL_QUANT_MAX_PARTS; i++) {
        if (!host->part[i]) continue;
        size_t words = (host->part_bytes[i] + 3) / 4;
        int32_t *w = halloc(words * 4), *p;
        memset(w, 0, words * 4);
        memcpy(w, host->part[i], host->part_bytes[i]);
        TRYI(d_put_i32(d, w, words, &p));
        dev->part[i] = p;
    }
    return 0;
}

/* be->dequant_rows and be->dequant_gather against rl_dequant_hf_rows_f32:
 * bitwise in f32, and that rounded once to bf16 in the bf16 mode */
static int case_dequant(tctx *t, const tcase *c)
{
    tdev *d = t->dut;
    rng_t *r = &t->rng;
    const int64_t rows = c->n, cols = c->d, g = c->qgroup;
    const int sdt = c->src == RL_F32 ? RL_QHF_SCALE_F32 : c->src == RL_BF16 ? RL_QHF_SCALE_BF16
                                                                           : RL_QHF_SCALE_F16;
    const size_t ss = c->src == RL_F32 ? 4 : 2;
    rl_qtensor q = {.family = c->qf, .rows = rows, .cols = cols, .group = g};
    q.subtype = RL_QHF_SUBTYPE(c->qbits, sdt, c->qflags & QV1 ? RL_QHF_ZERO_MINUS_ONE : 0);
    if (c->qf == RL_QF_AWQ) {
        const int64_t groups = cols / g;
        q.part_bytes[0] = (size_t)(cols * rows / 8) * 4;
        q.part[0] = rand_words(r, q.part_bytes[0] / 4);
        if (c->qflags & QZ) {
            q.part_bytes[1] = (size_t)(groups * rows / 8) * 4;
            q.part[1] = rand_words(r, q.part_bytes[1] / 4);
        }
        q.part_bytes[2] = (size_t)(groups * rows) * ss;
        q.part[2] = rand_scales(r, (size_t)(groups * rows), c->src);
    } else if (c->qf == RL_QF_GPTQ) {
        const int64_t pf = 32 / c->qbits, ng = g ? cols / g : 1;
        q.group = g ? g : cols;   /* group 0: one group over every input feature */
        q.part_bytes[0] = (size_t)(cols / pf * rows) * 4;
        q.part[0] = rand_words(r, q.part_bytes[0] / 4);
        if (c->qflags & QZ) {
            q.part_bytes[1] = (size_t)(ng * rows / pf) * 4;
            q.part[1] = rand_words(r, q.part_bytes[1] / 4);
        }
        q.part_bytes[2] = (size_t)(ng * rows) * ss;
        q.part[2] = rand_scales(r, (size_t)(ng * rows), c->src);
        if (c->qflags & QG) {   /* act-order: any group for any input feature */
            int32_t *gi = halloc((size_t)cols * 4);
            for (int64_t i = 0; i < cols; i++) gi[i] = (int32_t)rng_int(r, ng);
            q.part[3] = gi;
            q.part_bytes[3] = (size_t)cols * 4;
        }
    } else {
        const int64_t sr = (rows + g - 1) / g, sc = (cols + g - 1) / g;
        unsigned char *w = halloc((size_t)(rows * cols));
        for (int64_t i = 0; i < rows * cols; i++) {
            w[i] = (unsigned char)rng_u64(r);
            if ((w[i] & 0x7F) == 0x7F) w[i] ^= 1;   /* no NaN code */
        }
        q.part[0] = w;
        q.part_bytes[0] = (size_t)(rows * cols);
        q.part_bytes[1] = (size_t)(sr * sc) * ss;
        q.part[1] = rand_scales(r, (size_t)(sr * sc), c->src);
    }
    char err[256];
    if (rl_qtensor_validate_hf(&q, err, sizeof err)) {
        fail_msg(t->r, "the random tensor is not valid: %s", err);
        return 0;
    }
    const rl_dtype wd = weight_of(t);
    rl_qtensor qd;
    TRYI(d_put_parts(d, &q, &qd));
    /* every row, and a range that cuts AWQ words and 32-row tiles */
    const int64_t ranges[2][2] = {{0, rows}, {3, rows - 5}};
    for (int k = 0; k < 2; k++) {
        const int64_t r0 = ranges[k][0], r1 = ranges[k][1], n = (r1 - r0) * cols;
        float *want = hf((size_t)n), *got = hf((size_t)n);
        if (rl_dequant_hf_rows_f32(&q, r0, r1, want, 1, NULL, err, sizeof err)) {
            fail_msg(t->r, "CPU dequantization: %s", err);
            return 0;
        }
        round_to(want, (size_t)n, wd);
        void *out;
        TRYI(d_empty(d, (size_t)n, wd, &out));
        TRY(d, d->be->dequant_rows(d->be, &qd, r0, r1, out, wd));
        TRYI(d_get(d, out, (size_t)n, wd, got));
        check_bits(t->r, k ? "rows [3, rows-5) vs cpu" : "rows vs cpu", got, want, (size_t)n);
    }
    /* the embedding path: rows of tokens, in the weight dtype, times a scale */
    const int64_t T = 9;
    int32_t *tok = halloc((size_t)T * 4), *tp;
    for (int64_t i = 0; i < T; i++) tok[i] = (int32_t)rng_int(r, rows);
    tok[0] = (int32_t)(rows - 1);
    float *all = hf((size_t)(rows * cols)), *want = hf((size_t)(T * cols));
    float *got = hf((size_t)(T * cols));
    if (rl_dequant_hf_rows_f32(&q, 0, rows, all, 1, NULL, err, sizeof err)) {
        fail_msg(t->r, "CPU dequantization: %s", err);
        return 0;
    }
    round_to(all, (size_t)(rows * cols), wd);
    const float scale = 3.5f;
    for (int64_t i = 0; i < T; i++)
        for (int64_t j = 0; j < cols; j++) want[i * cols + j] = all[tok[i] * cols + j] * scale;
    void *x;
    TRYI(d_put_i32(d, tok, (size_t)T, &tp));
    TRYI(d_empty(d, (size_t)(T * cols), d->be->res_dtype, &x));
    TRY(d, d->be->dequant_gather(d->be, &qd, tp, T, x, scale));
    TRYI(d_get(d, x, (size_t)(T * cols), d->be->res_dtype, got));
    check_bits(t->r, "gathered rows * scale vs cpu", got, want, (size_t)(T * cols));
    return 0;
}

/* The bounds can fail: outputs with known defects must be rejected. */
static int case_harness(tctx *t, const tcase *c)
{
    const int64_t M = 32, N = 64, K = 512;
    float *x = normals(&t->rng, (size_t)(M * K), 1, 0);
    float *w = normals(&t->rng, (size_t)(N * K), 1 / sqrt((double)K), 0);
    double *ref = hd((size_t)(M * N));
    float *f32 = hf((size_t)(M * N)), *tf32 = hf((size_t)(M * N)), *b16 = hf((size_t)(M * N));
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0;
            float sf = 0, st = 0;
            for (int64_t k = 0; k < K; k++) {
                s += (double)x[i * K + k] * w[j * K + k];
                sf += x[i * K + k] * w[j * K + k];
                st += tf32_round(x[i * K + k]) * tf32_round(w[j * K + k]);
            }
            ref[i * N + j] = s;
            f32[i * N + j] = sf;
            tf32[i * N + j] = st;
            b16[i * N + j] = bf16_round((float)s);
        }
    cres probe = {0};
    struct { const char *what; const float *got; bound b; int pass; } cases[] = {
        {"f32 GEMM within the fp32-mode bound", f32, F32_MODE, 1},
        {"TF32 GEMM outside the fp32-mode bound", tf32, F32_MODE, 0},
        {"bf16-rounded output within BF16_EPS", b16, {BF16_EPS, SMALL_FLOOR, 0}, 1},
        {"bf16-rounded output outside the fp32-mode bound", b16, F32_MODE, 0},
        {"bf16-rounded output outside the CPU gemm bound", b16, {1e-5, F32_FLOOR, 0}, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memset(&probe, 0, sizeof probe);
        int pass = check(&probe, cases[i].what, cases[i].got, ref, (size_t)(M * N), cases[i].b);
        if (pass == cases[i].pass) note(t->r, 0, 0, "%s", probe.line);
        else fail_msg(t->r, "harness: expected %s: %s", cases[i].pass ? "pass" : "fail", probe.line);
    }
    /* a NaN, and one ulp off under an exact bound */
    float *one = hf((size_t)(M * N));
    for (int64_t i = 0; i < M * N; i++) one[i] = (float)ref[i];
    one[7] = NAN;
    memset(&probe, 0, sizeof probe);
    if (check(&probe, "nan", one, ref, (size_t)(M * N), (bound){1, 1, 0}))
        fail_msg(t->r, "harness: a NaN passed");
    one[7] = (float)ref[7];
    one[9] = nextafterf(one[9], INFINITY);
    memset(&probe, 0, sizeof probe);
    if (check(&probe, "ulp", one, widen(one, (size_t)(M * N)), (size_t)(M * N), EXACT) != 1)
        fail_msg(t->r, "harness: equal arrays failed the exact bound");
    float *orig = hf((size_t)(M * N));
    for (int64_t i = 0; i < M * N; i++) orig[i] = (float)ref[i];
    memset(&probe, 0, sizeof probe);
    if (check_f(&probe, "ulp", one, orig, (size_t)(M * N), EXACT) ||
        check_bits(&probe, "ulp", one, orig, (size_t)(M * N)))
        fail_msg(t->r, "harness: a one-ulp change passed an exact check");
    if (!t->r->failed) note(t->r, 0, 0, "NaN and one-ulp changes rejected");
    return 0;
}

/* ---- the driver ----------------------------------------------------------- */

static int run_case(tctx *t, const tcase *c)
{
    switch (c->op) {
    case OP_BACKEND: return case_backend(t, c);
    case OP_MEMORY: return case_memory(t, c);
    case OP_EMBED: return case_embed(t, c);
    case OP_RMSNORM: return case_rmsnorm(t, c);
    case OP_GEMM: return case_gemm(t, c);
    case OP_QK_NORM_ROPE: return case_qk(t, c);
    case OP_ATTENTION: return case_attention(t, c);
    case OP_GLU: return case_glu(t, c);
    case OP_CAST: return case_cast(t, c);
    case OP_POOL: return case_pool(t, c);
    case OP_UPLOAD: return case_upload(t, c);
    case OP_DOWNLOAD: return case_download(t, c);
    case OP_DEQUANT: return case_dequant(t, c);
    case OP_HARNESS: return case_harness(t, c);
    }
    return 0;
}

/* Whether a case runs on a target. Ops whose behaviour does not depend on
 * the storage mode (they take their dtypes as arguments) run on the bf16
 * backend only; the attention runs on all three CUDA variants, every other
 * op on bf16 and f32. */
static int runs_on(const tcase *c, tgt g)
{
    if (g == TGT_CPU) return c->where != CUDA_ONLY;
    if (c->where == CPU_ONLY) return 0;
    switch (c->op) {
    case OP_ATTENTION: return c->cuda_refuses ? g == TGT_BF16 || g == TGT_F32 : 1;
    case OP_POOL: case OP_UPLOAD: case OP_DOWNLOAD: case OP_MEMORY: return g == TGT_BF16;
    case OP_CAST: return g == TGT_BF16 || g == TGT_F32;
    default: return g == TGT_BF16 || g == TGT_F32;
    }
}

static const char *const TGT_LABEL[] = {"cpu", "cuda-bf16", "cuda-bf16-fma", "cuda-f32"};

static void usage(void)
{
    fprintf(stderr, "usage: test_backend_ops cpu|cuda [--seed S] [--filter TEXT] [--list] [-v]\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "cpu") != 0 && strcmp(argv[1], "cuda") != 0)) {
        usage();
        return 2;
    }
    const int cuda = strcmp(argv[1], "cuda") == 0;
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    seed %= 1000000007ull;
    const char *filter = NULL;
    int list = 0, verbose = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--filter") == 0 && i + 1 < argc) filter = argv[++i];
        else if (strcmp(argv[i], "--list") == 0) list = 1;
        else if (strcmp(argv[i], "-v") == 0) verbose = 1;
        else { usage(); return 2; }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    tdev devs[TGT_COUNT] = {{0}};
    for (int g = 0; g < TGT_COUNT; g++) devs[g].label = TGT_LABEL[g];
    if (!list) {
        if (rl_backend_cpu_create(2, &devs[TGT_CPU].be) != RL_OK) {
            fprintf(stderr, "test_backend_ops: CPU backend: %s\n", rl_last_error());
            return 2;
        }
        if (cuda) {
            if (!rl_cuda_compiled()) {
                printf("SKIP: CUDA is not compiled into this test binary\n");
                return 77;
            }
            if (rl_cuda_device_count() == 0) {
                rl_status st = rl_cuda_check_device(0);
                printf("SKIP: no usable CUDA device (%s)\n", st != RL_OK ? rl_last_error() : "?");
                return 77;
            }
            /* RJEPA_ATTN is read when a CUDA backend is created */
            const char *user_attn = getenv("RJEPA_ATTN");
            char saved[64] = "";
            if (user_attn) snprintf(saved, sizeof saved, "%s", user_attn);
            unsetenv("RJEPA_ATTN");
            rl_status st = rl_backend_cuda_create_ex(0, RL_BF16, &devs[TGT_BF16].be);
            if (st == RL_OK) st = rl_backend_cuda_create_ex(0, RL_F32, &devs[TGT_F32].be);
            if (st == RL_OK) {
                setenv("RJEPA_ATTN", "fma", 1);
                st = rl_backend_cuda_create_ex(0, RL_BF16, &devs[TGT_BF16_FMA].be);
                unsetenv("RJEPA_ATTN");
            }
            if (saved[0]) setenv("RJEPA_ATTN", saved, 1);
            if (st != RL_OK) {
                fprintf(stderr, "test_backend_ops: CUDA backend: %s\n", rl_last_error());
                return 2;
            }
        }
    }

    int n_run = 0, n_fail = 0;
    printf("test_backend_ops %s, seed %llu\n", cuda ? "cuda" : "cpu", (unsigned long long)seed);
    for (int g = cuda ? TGT_BF16 : TGT_CPU; g <= (cuda ? TGT_F32 : TGT_CPU); g++) {
        if (!list && devs[g].be)
            printf("== %s: %s (%s)\n", TGT_LABEL[g], devs[g].be->name, devs[g].be->kernel);
        for (int i = 0; i < N_CASES; i++) {
            const tcase *c = &CASES[i];
            if (!runs_on(c, (tgt)g)) continue;
            char name[160];
            case_name(c, name, sizeof name);
            if (filter && !strstr(name, filter)) continue;
            if (list) { printf("%-14s %s\n", TGT_LABEL[g], name); continue; }
            cres r = {0};
            r.verbose = verbose;
            /* the inputs of a case depend on the seed and the case alone */
            tctx t = {.cuda = cuda, .target = (tgt)g, .dut = &devs[g], .cpu = &devs[TGT_CPU],
                      .rng = {seed * 0x100000001B3ull + (uint64_t)i * 0x9E3779B97F4A7C15ull},
                      .r = &r};
            g_err[0] = 0;
            const int stated = !c->feat || (devs[g].be->caps->features & (1u << (c->feat - 1)));
            if (!stated) {
                /* caps and ops agree: an op whose feature the caps do not state refuses it */
                if (run_case(&t, c) != 0 && strstr(g_err, "returned 1:"))
                    note(&r, 0, 0, "refused (caps state no %s): %.120s",
                         rl_feature_name(c->feat - 1), g_err);
                else
                    fail_msg(&r, "caps state no %s but the op %s", rl_feature_name(c->feat - 1),
                             g_err[0] ? g_err : "ran");
            } else if (run_case(&t, c) != 0) {
                fail_msg(&r, "error: %s", g_err);
            }
            d_release(&devs[g]);
            d_release(&devs[TGT_CPU]);
            hfree_all();
            n_run++;
            if (r.failed) n_fail++;
            printf("%s %-14s %-50s %s\n", r.failed ? "FAIL" : "ok  ", TGT_LABEL[g], name, r.line);
            if (r.failed && strcmp(r.why, r.line) != 0) printf("     %s\n", r.why);
            if (r.failed)
                printf("     rerun: test_backend_ops %s --seed %llu --filter '%s'\n",
                       cuda ? "cuda" : "cpu", (unsigned long long)seed, name);
        }
    }
    for (int g = 0; g < TGT_COUNT; g++)
        if (devs[g].be) devs[g].be->destroy(devs[g].be);
    if (list) return 0;
    printf("test_backend_ops %s: %d cases, %d passed, %d failed (seed %llu)\n",
           cuda ? "cuda" : "cpu", n_run, n_run - n_fail, n_fail, (unsigned long long)seed);
    return n_fail ? 1 : 0;
}
