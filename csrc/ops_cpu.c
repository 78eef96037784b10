/* ops_cpu.c - the CPU backend: fp32 storage and compute, the engine's own
 * GEMM (gemm_builtin.c; RJEPA_CPU_ISA picks its kernels) or, with
 * RJEPA_GEMM=openblas in builds that link it, OpenBLAS (scipy-openblas32);
 * OpenMP for everything else.
 *
 * Design choices:
 * - Packing must be bitwise neutral: a sequence gives the same bits alone or
 *   anywhere in a packed batch. The own GEMM's bits depend on a row's
 *   operands alone, so it runs over the whole packed batch at once (large M);
 *   OpenBLAS results for a row depend on M, so with it GEMMs run once per
 *   sequence. Every other op computes a row/head/span from that row's data
 *   only, in a fixed order, with no reduction split across threads.
 * - Numerics follow HF transformers in fp32: RMSNorm x * 1/sqrt(mean(x^2)+eps)
 *   * (offset + w), rotate_half RoPE with cos/sin of (pos * inv_freq) in fp32,
 *   scores scaled then soft-capped (cap * tanh(s / cap)), softmax in fp32 with
 *   the max subtracted, silu(g) = g / (1 + exp(-g)), gelu_tanh as torch's
 *   approximate="tanh".
 * - Attention is attention_cpu.c's fused kernel (the same bits on every ISA).
 * - No allocation per token: per-thread scratch (attention keys and scores, pooling
 *   sums) and the RoPE cos/sin table live in the backend and only grow.
 */
#define _POSIX_C_SOURCE 200809L   /* posix_memalign */
#include "ops_cpu.h"

#include "attention_cpu.h"
#include "gemm_builtin.h"
#include "vexp.h"
#ifndef RL_BLAS_BUILTIN
#include <cblas.h>
#endif
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int n_threads;
    float *scores;          /* [n_threads, scores_len] attention scratch           */
    int64_t scores_len;
    double *sums;           /* [n_threads, sums_len] mean-pool accumulators        */
    int64_t sums_len;
    struct rope_slot {      /* two tables: global and sliding layers (Gemma-3) alternate */
        float *tab;         /* [npos, 2, half]: cos then sin per position            */
        float *inv;         /* [half] inv_freq the table was built from              */
        int64_t npos, half;
        uint64_t used;      /* last use, for replacing the older slot                */
    } rope[2];
    uint64_t rope_clock;
    int64_t *jobs;          /* [jobs_len, 2] GEMM jobs: sequence, first column     */
    int64_t jobs_len;
    char kernel[192];       /* rl_backend.kernel: the BLAS build and its core type  */
    int openblas;           /* RJEPA_GEMM=openblas: GEMMs per sequence by OpenBLAS  */
    rl_cpu_isa isa;         /* the own GEMM's kernels (RJEPA_CPU_ISA)               */
    double prof_s[8];       /* RJEPA_CPU_PROFILE=1: seconds per op (PROF_NAMES)     */
    double prof_gemm_flops; /* and the GEMMs' floating-point operations             */
} cpu_impl;

/* ---- GEMM --------------------------------------------------------------- */

/* Row-major C[M, N] = alpha * A[M, K] op(B) + beta * C (op(B) = B^T for
 * transb, B [N, K]; else B [K, N]); 0 or -1 (no scratch memory). OpenBLAS
 * runs on one thread (rl_backend_cpu_create sets it); the own GEMM uses
 * up to n_threads when called outside a parallel region. */
static int sgemm(const cpu_impl *im, int transb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, int n_threads)
{
#ifndef RL_BLAS_BUILTIN
    if (im->openblas) {
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, transb ? CblasTrans : CblasNoTrans,
                          (blasint)M, (blasint)N, (blasint)K, alpha, A, (blasint)lda, B,
                          (blasint)ldb, beta, C, (blasint)ldc);
        return 0;
    }
#endif
    return rl_gemm_f32(im->isa, transb, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc,
                       n_threads);
}

void rl_cpu_blas_name(char *buf, size_t cap)
{
#ifdef RL_BLAS_BUILTIN
    snprintf(buf, cap, "builtin C GEMM");
#else
    snprintf(buf, cap, "scipy-openblas32 %s", scipy_openblas_get_config());
#endif
}

int64_t rl_cpu_gemm_row_align(void)
{
    rl_cpu_isa isa;
    char err[256];
    const char *gemm = getenv("RJEPA_GEMM");
    if (gemm && strcmp(gemm, "openblas") == 0) return 1;
    /* an unusable RJEPA_CPU_ISA fails creating the backend; plan for the default */
    if (rl_gemm_isa_from_env(&isa, err, sizeof err) != 0)
        isa = rl_gemm_isa_available(RL_ISA_AVX512) ? RL_ISA_AVX512
            : rl_gemm_isa_available(RL_ISA_AVX2) ? RL_ISA_AVX2 : RL_ISA_GENERIC;
    return rl_gemm_panel_width(isa);
}

static cpu_impl *impl_of(rl_backend *be) { return (cpu_impl *)be->impl; }

/* Below this many elements an op runs on one thread (fork/join costs more). */
#define PAR_MIN 16384

/* ---- memory ------------------------------------------------------------- */

static rl_status cpu_alloc(rl_backend *be, void **ptr, size_t bytes)
{
    *ptr = NULL;
    if (posix_memalign(ptr, 64, bytes ? bytes : 64) != 0) {
        *ptr = NULL;
        return RL_FAIL(RL_ERR_NOMEM, "cannot allocate %.1f MiB of host memory", bytes / 1048576.0);
    }
    return RL_OK;
}

static void cpu_free(rl_backend *be, void *ptr) { free(ptr); }
static void cpu_host_release(void *ptr) { free(ptr); }

static rl_status cpu_upload(rl_backend *be, void *dst, rl_dtype dst_dtype, size_t off,
                            const void *src, rl_dtype src_dtype, size_t n)
{
    if (dst_dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "the CPU backend stores float32 only, asked for %s",
                       rl_dtype_name(dst_dtype));
    float *d = (float *)dst + off;
    size_t es = rl_dtype_size(src_dtype);
    int nt = impl_of(be)->n_threads;
    /* chunks of 64K elements converted in parallel (large embeddings) */
    int64_t chunks = (int64_t)((n + 65535) / 65536);
#pragma omp parallel for num_threads(nt) schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        size_t lo = (size_t)c * 65536, len = n - lo < 65536 ? n - lo : 65536;
        rl_convert_to_f32(d + lo, (const char *)src + lo * es, src_dtype, len);
    }
    return RL_OK;
}

static rl_status cpu_upload_i32(rl_backend *be, int32_t *dst, const int32_t *src, size_t n)
{
    memcpy(dst, src, n * 4);
    return RL_OK;
}

static rl_status cpu_download_f32(rl_backend *be, float *dst, const float *src, size_t n)
{
    memcpy(dst, src, n * 4);
    return RL_OK;
}

static rl_status cpu_sync(rl_backend *be) { return RL_OK; }

static rl_status cpu_mem_info(rl_backend *be, size_t *free_b, size_t *total_b)
{
    *free_b = *total_b = 0;
    return RL_OK;
}

static int cpu_is_resident(rl_backend *be, const void *ptr) { return 1; }

/* ---- SiLU, vectorized (exp: vexp.h) ---------------------------------------- */

#ifdef RL_VEC_X86
__attribute__((target("avx2,fma"))) static int64_t silu_mul8(float *o, const float *g,
                                                              const float *u, int64_t n)
{
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_xor_ps(gv, neg));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(u + i)));
    }
    return i;
}
#endif

/* o = silu(g) * u = g / (1 + exp(-g)) * u */
static void silu_mul(float *o, const float *g, const float *u, int64_t n, int vec)
{
    int64_t i = 0;
#ifdef RL_VEC_X86
    if (vec) i = silu_mul8(o, g, u, n);
#else
    (void)vec;
#endif
    for (; i < n; i++) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
}

/* ---- elementwise / row ops ---------------------------------------------- */

static rl_status cpu_embed(rl_backend *be, const int32_t *tokens, int64_t T, const void *table,
                           int64_t d, void *x, float scale)
{
    const float *tab = table;
    float *out = x;
#pragma omp parallel for num_threads(impl_of(be)->n_threads) schedule(static) if (T * d > PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *src = tab + (int64_t)tokens[t] * d;
        float *o = out + t * d;
        if (scale == 1.0f) memcpy(o, src, (size_t)d * 4);
        else for (int64_t i = 0; i < d; i++) o[i] = src[i] * scale;
    }
    return RL_OK;
}

/* n = x / sqrt(mean(x^2) + eps) * (off + w) over one row of n (sum of squares
 * in double); y = n, or y += n when acc. */
static void rms_row(const float *x, const float *w, float *y, int64_t n, float eps, float off,
                    int acc)
{
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    if (acc) for (int64_t i = 0; i < n; i++) y[i] += (off + w[i]) * (x[i] * inv);
    else for (int64_t i = 0; i < n; i++) y[i] = (off + w[i]) * (x[i] * inv);
}

static rl_status cpu_rmsnorm(rl_backend *be, const void *x, rl_dtype x_dtype, const void *w,
                             void *y, rl_dtype out_dtype, int64_t rows, int64_t d, float eps,
                             float w_offset, int accumulate)
{
    if (out_dtype != RL_F32 || x_dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "CPU rmsnorm: input and output must be float32");
#pragma omp parallel for num_threads(impl_of(be)->n_threads) schedule(static) if (rows * d > PAR_MIN)
    for (int64_t r = 0; r < rows; r++)
        rms_row((const float *)x + r * d, w, (float *)y + r * d, d, eps, w_offset, accumulate);
    return RL_OK;
}

static rl_status cpu_cast(rl_backend *be, const void *src, rl_dtype src_dtype, void *dst,
                          rl_dtype dst_dtype, int64_t n)
{
    if (src_dtype != RL_F32 || dst_dtype != RL_F32)
        return RL_FAIL(RL_ERR_INVALID, "CPU cast: float32 only, asked %s -> %s",
                       rl_dtype_name(src_dtype), rl_dtype_name(dst_dtype));
    if (dst != src) memcpy(dst, src, (size_t)n * 4);
    return RL_OK;
}

static rl_status grow_jobs(cpu_impl *im, int64_t n)
{
    if (n <= im->jobs_len) return RL_OK;
    int64_t *p = realloc(im->jobs, (size_t)n * 2 * sizeof *p);
    if (!p) return RL_FAIL(RL_ERR_NOMEM, "out of host memory");
    im->jobs = p;
    im->jobs_len = n;
    return RL_OK;
}

/* GEMM jobs. A sequence of fewer than GEMM_SPLIT_ROWS tokens is one job over
 * all N columns; a longer one is split into jobs of GEMM_COLS columns. OpenBLAS
 * rounding of an output element depends on the call's M and N, so both the
 * split rule and the chunk width depend on the sequence alone: never on the
 * packing (results bitwise equal alone or packed) and never on the thread
 * count (a run resumed on a machine with other cores gives the same bytes).
 * (Only RJEPA_GEMM=openblas runs these jobs: the own GEMM's rounding depends
 * on neither, so it runs once over the whole packed batch.) */
#define GEMM_SPLIT_ROWS 256
#define GEMM_COLS 256

static int64_t gemm_jobs_of(int64_t m, int64_t N)
{
    return m < GEMM_SPLIT_ROWS ? 1 : (N + GEMM_COLS - 1) / GEMM_COLS;
}

static rl_status cpu_gemm(rl_backend *be, const rl_segments *seg, const void *x, const void *w,
                          const void *bias, void *y, int64_t M, int64_t N, int64_t K, int accumulate)
{
    const float *X = x, *W = w, *B = bias;
    float *Y = y;
    cpu_impl *im = impl_of(be);
    const int32_t *cu = seg->cu_seqlens_host;
    if (!im->openblas) {   /* one GEMM over the packed batch, bias and residual add fused;
                              W is packed (cpu_gemm_pack_rows) */
        if (rl_gemm_f32_packed(im->isa, M, N, K, 1.0f, X, K, W, B, accumulate ? 1.0f : 0.0f, Y,
                               N, im->n_threads) != 0)
            return RL_FAIL(RL_ERR_NOMEM, "out of host memory (GEMM scratch)");
        return RL_OK;
    }
    /* job j of the batch -> (sequence, first column); built on the host */
    int64_t n_jobs = 0;
    for (int64_t s = 0; s < seg->n_seqs; s++) n_jobs += gemm_jobs_of(cu[s + 1] - cu[s], N);
    RL_TRY(grow_jobs(im, n_jobs));
    for (int64_t s = 0, j = 0; s < seg->n_seqs; s++) {
        int64_t k = gemm_jobs_of(cu[s + 1] - cu[s], N);
        for (int64_t c = 0; c < k; c++, j++) {
            im->jobs[2 * j] = s;
            im->jobs[2 * j + 1] = k == 1 ? 0 : c * GEMM_COLS;
        }
    }
    /* the GEMM runs single-threaded inside each job (one thread pool, not two
     * spinning against each other); a lone job may use every thread itself
     * with the builtin GEMM (OpenBLAS stays on one) */
    const int inner = n_jobs > 1 ? 1 : im->n_threads;
    int failed = 0;
#pragma omp parallel for num_threads(im->n_threads) schedule(dynamic, 1) if (n_jobs > 1) \
    reduction(| : failed)
    for (int64_t j = 0; j < n_jobs; j++) {
        int64_t s = im->jobs[2 * j], n0 = im->jobs[2 * j + 1];
        int64_t r0 = cu[s], m = cu[s + 1] - r0;
        int64_t nn = gemm_jobs_of(m, N) == 1 ? N : (N - n0 < GEMM_COLS ? N - n0 : GEMM_COLS);
        if (sgemm(im, 1, m, nn, K, 1.0f, X + r0 * K, K, W + n0 * K, K, accumulate ? 1.0f : 0.0f,
                  Y + r0 * N + n0, N, inner) != 0) {
            failed = 1;
            continue;
        }
        if (B)
            for (int64_t r = r0; r < r0 + m; r++) {
                float *row = Y + r * N;
                for (int64_t c = n0; c < n0 + nn; c++) row[c] += B[c];
            }
    }
    (void)M;   /* the rows are the sequences' (seg), which sum to M */
    if (failed) return RL_FAIL(RL_ERR_NOMEM, "out of host memory (GEMM scratch)");
    return RL_OK;
}

/* Rows [r0, r0 + n) of a GEMM weight [N, K] into the own GEMM's packed
 * panels (rl_backend.gemm_pack_rows), converted to f32 a panel's rows at a
 * time; threads take whole panels. */
static rl_status cpu_gemm_pack_rows(rl_backend *be, void *dst, int64_t N, int64_t K, int64_t r0,
                                    const void *src, rl_dtype src_dtype, int64_t n)
{
    const cpu_impl *im = impl_of(be);
    if (n <= 0) return RL_OK;
    const int64_t NR = rl_gemm_panel_width(im->isa), first = r0 / NR;
    const int64_t nb = (r0 + n - 1) / NR - first + 1;
    const size_t es = rl_dtype_size(src_dtype);
    const int convert = src_dtype != RL_F32;
    int failed = 0;
#ifdef _OPENMP
    const int par = nb > 1 && n * K > PAR_MIN && !omp_in_parallel();
#else
    const int par = 0;
#endif
#pragma omp parallel num_threads(im->n_threads) if (par) reduction(| : failed)
    {
        float *rows = convert ? malloc((size_t)(NR * K) * sizeof *rows) : NULL;
        if (convert && !rows) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            if (convert && !rows) continue;
            const int64_t a = (first + b) * NR > r0 ? (first + b) * NR : r0;
            const int64_t e = (first + b + 1) * NR < r0 + n ? (first + b + 1) * NR : r0 + n;
            const char *s = (const char *)src + (size_t)((a - r0) * K) * es;
            if (convert) rl_convert_to_f32(rows, s, src_dtype, (size_t)((e - a) * K));
            rl_gemm_pack_rows(im->isa, N, K, a, e - a, convert ? rows : (const float *)s, K, dst);
        }
        free(rows);
    }
    if (failed) return RL_FAIL(RL_ERR_NOMEM, "out of host memory (packing a GEMM weight)");
    return RL_OK;
}

/* The cos/sin table of pos * inv_freq for pos < npos (fp32, as HF does): one
 * of two cached slots, rebuilt only when a third inv_freq or longer sequences
 * come (global and sliding layers of Gemma-3 alternate two inv_freq). */
static rl_status rope_table(cpu_impl *im, const float *inv_freq, int64_t half, int64_t npos,
                            const float **out)
{
    struct rope_slot *sl = NULL;
    for (int i = 0; i < 2 && !sl; i++)
        if (im->rope[i].tab && im->rope[i].half == half &&
            memcmp(im->rope[i].inv, inv_freq, (size_t)half * 4) == 0)
            sl = &im->rope[i];
    im->rope_clock++;
    if (sl && npos <= sl->npos) {
        sl->used = im->rope_clock;
        *out = sl->tab;
        return RL_OK;
    }
    if (sl && npos < 2 * sl->npos) npos = 2 * sl->npos;
    if (!sl) sl = im->rope[0].used <= im->rope[1].used ? &im->rope[0] : &im->rope[1];
    float *tab = malloc((size_t)npos * 2 * (size_t)half * 4);
    float *inv = malloc((size_t)half * 4);
    if (!tab || !inv) { free(tab); free(inv); return RL_FAIL(RL_ERR_NOMEM, "out of host memory"); }
    memcpy(inv, inv_freq, (size_t)half * 4);
#pragma omp parallel for num_threads(im->n_threads) schedule(static) if (npos * half > PAR_MIN)
    for (int64_t p = 0; p < npos; p++)
        for (int64_t i = 0; i < half; i++) {
            float ang = (float)p * inv[i];
            tab[(p * 2) * half + i] = cosf(ang);
            tab[(p * 2 + 1) * half + i] = sinf(ang);
        }
    free(sl->tab);
    free(sl->inv);
    sl->tab = tab;
    sl->inv = inv;
    sl->half = half;
    sl->npos = npos;
    sl->used = im->rope_clock;
    *out = tab;
    return RL_OK;
}

/* HF rotate_half: out_i = x_i cos - x_{i+h} sin, out_{i+h} = x_{i+h} cos + x_i sin. */
static void rope_head(float *x, const float *cs, const float *sn, int64_t half)
{
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cs[i] - b * sn[i];
        x[i + half] = b * cs[i] + a * sn[i];
    }
}

static rl_status cpu_qk_norm_rope(rl_backend *be, const rl_segments *seg, void *qkv, int64_t T,
                                  int64_t nh, int64_t nkv, int64_t hd, const void *q_norm,
                                  const void *k_norm, int norm_mode, float w_offset, float eps,
                                  const float *inv_freq)
{
    cpu_impl *im = impl_of(be);
    int64_t half = hd / 2, W = (nh + 2 * nkv) * hd;
    if (norm_mode < RL_QK_NORM_NONE || norm_mode > RL_QK_NORM_PROJ ||
        (norm_mode != RL_QK_NORM_NONE && (!q_norm || !k_norm)))
        return RL_FAIL(RL_ERR_INVALID, "CPU qk_norm_rope: norm_mode %d needs q_norm and k_norm "
                       "(0: none, 1: per head, 2: whole projection)", norm_mode);
    const float *tab;
    RL_TRY(rope_table(im, inv_freq, half, seg->max_seqlen, &tab));
    const int32_t *pos = seg->positions_dev;
#pragma omp parallel for num_threads(im->n_threads) schedule(static) if (T * W > PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = tab + (int64_t)pos[t] * 2 * half, *sn = cs + half;
        float *row = (float *)qkv + t * W;
        if (norm_mode == RL_QK_NORM_PROJ) {        /* q row, then k row, before the head split */
            rms_row(row, q_norm, row, nh * hd, eps, w_offset, 0);
            rms_row(row + nh * hd, k_norm, row + nh * hd, nkv * hd, eps, w_offset, 0);
        }
        for (int64_t h = 0; h < nh + nkv; h++) {   /* q heads, then k heads */
            float *x = row + h * hd;
            if (norm_mode == RL_QK_NORM_HEAD)
                rms_row(x, h < nh ? q_norm : k_norm, x, hd, eps, w_offset, 0);
            rope_head(x, cs, sn, half);
        }
    }
    return RL_OK;
}

static rl_status grow_scratch(cpu_impl *im, int64_t scores_len, int64_t sums_len)
{
    if (scores_len > im->scores_len) {
        float *p = realloc(im->scores, (size_t)im->n_threads * (size_t)scores_len * 4);
        if (!p) return RL_FAIL(RL_ERR_NOMEM, "out of host memory");
        im->scores = p;
        im->scores_len = scores_len;
    }
    if (sums_len > im->sums_len) {
        double *p = realloc(im->sums, (size_t)im->n_threads * (size_t)sums_len * 8);
        if (!p) return RL_FAIL(RL_ERR_NOMEM, "out of host memory");
        im->sums = p;
        im->sums_len = sums_len;
    }
    return RL_OK;
}

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static rl_status cpu_attention(rl_backend *be, const rl_segments *seg, const void *qkv, void *out,
                               int64_t T, int64_t nh, int64_t nkv, int64_t hd, float scale,
                               int64_t window, float softcap)
{
    if (window < 0 || !(softcap >= 0.0f))
        return RL_FAIL(RL_ERR_INVALID, "CPU attention: window (%lld) and softcap (%g) must be >= 0",
                       (long long)window, (double)softcap);
    cpu_impl *im = impl_of(be);
    RL_TRY(grow_scratch(im, rl_attention_scratch_floats(seg->max_seqlen, hd, window), 0));
    const float *QKV = qkv;
    float *O = out;
    int64_t W = (nh + 2 * nkv) * hd, Wo = nh * hd, group = nh / nkv, B = seg->n_seqs;
    int64_t nblk = (seg->max_seqlen + RL_ATT_QBLK - 1) / RL_ATT_QBLK;
    const int32_t *cu = seg->cu_seqlens_host;
    /* jobs (query block, sequence, KV head), the costlier late blocks first;
     * a block past a sequence's end is empty */
#pragma omp parallel for num_threads(im->n_threads) schedule(dynamic, 1) if (T > 1)
    for (int64_t job = 0; job < nblk * B * nkv; job++) {
        int64_t blk = nblk - 1 - job / (B * nkv), s = job % (B * nkv) / nkv, kvh = job % nkv;
        int64_t r0 = cu[s], n = cu[s + 1] - r0, i0 = blk * RL_ATT_QBLK;
        if (i0 >= n) continue;
        const float *base = QKV + r0 * W;
        rl_attention_block(im->isa, base + kvh * group * hd, base + (nh + kvh) * hd,
                           base + (nh + nkv + kvh) * hd, O + r0 * Wo + kvh * group * hd, W, Wo, hd,
                           group, i0, n - i0 < RL_ATT_QBLK ? n - i0 : RL_ATT_QBLK, scale, window,
                           softcap, im->scores + (int64_t)thread_id() * im->scores_len);
    }
    return RL_OK;
}

/* torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
static float gelu_tanh(float x)
{
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
}

static rl_status cpu_glu(rl_backend *be, const void *gu, void *out, int64_t T, int64_t ff, int act)
{
    const float *G = gu;
    float *O = out;
    const int vec = impl_of(be)->isa >= RL_ISA_AVX2;
    if (act != RL_ACT_SILU && act != RL_ACT_GELU_TANH)
        return RL_FAIL(RL_ERR_INVALID, "CPU glu: unknown activation %d", act);
#pragma omp parallel for num_threads(impl_of(be)->n_threads) schedule(static) if (T * ff > PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *g = G + t * 2 * ff, *u = g + ff;
        float *o = O + t * ff;
        if (act == RL_ACT_SILU)
            silu_mul(o, g, u, ff, vec);
        else
            for (int64_t i = 0; i < ff; i++) o[i] = gelu_tanh(g[i]) * u[i];
    }
    return RL_OK;
}

static rl_status cpu_pool(rl_backend *be, const void *x, rl_dtype src_dtype, int64_t d,
                          const int32_t *spans, int64_t S, rl_pool mode, float *out)
{
    cpu_impl *im = impl_of(be);
    if (src_dtype != RL_F32) return RL_FAIL(RL_ERR_INVALID, "CPU pool: source must be float32");
    if ((unsigned)mode >= RL_POOL_COUNT)
        return RL_FAIL(RL_ERR_INVALID, "CPU pool: unknown pooling %d", (int)mode);
    RL_TRY(grow_scratch(im, 0, d));
    const float *X = x;
#pragma omp parallel for num_threads(im->n_threads) schedule(dynamic, 4) if (S > 1)
    for (int64_t s = 0; s < S; s++) {
        int64_t lo = spans[2 * s], hi = spans[2 * s + 1];
        float *o = out + s * d;
        if (mode == RL_POOL_FIRST) { memcpy(o, X + lo * d, (size_t)d * 4); continue; }
        if (mode == RL_POOL_LAST) { memcpy(o, X + (hi - 1) * d, (size_t)d * 4); continue; }
        if (mode == RL_POOL_MAX) {
            /* a selection, so exact; x != x keeps a NaN once seen (as np.max does) */
            memcpy(o, X + lo * d, (size_t)d * 4);
            for (int64_t r = lo + 1; r < hi; r++) {
                const float *row = X + r * d;
                for (int64_t c = 0; c < d; c++)
                    if (row[c] > o[c] || row[c] != row[c]) o[c] = row[c];
            }
            continue;
        }
        double *acc = im->sums + (int64_t)thread_id() * im->sums_len;
        for (int64_t c = 0; c < d; c++) acc[c] = 0.0;
        for (int64_t r = lo; r < hi; r++) {
            const float *row = X + r * d;
            for (int64_t c = 0; c < d; c++) acc[c] += row[c];
        }
        for (int64_t c = 0; c < d; c++) o[c] = (float)(acc[c] / (double)(hi - lo));
    }
    return RL_OK;
}

/* ---- profile (RJEPA_CPU_PROFILE=1) ----------------------------------------- */

/* Wall time per op, printed to stderr when the backend is destroyed: where a
 * CPU forward spends its time, and the GEMMs' GFLOP/s. The wrappers replace
 * the ops in the table only when profiling, so normal runs pay nothing. */
static const char *const PROF_NAMES[] = {"gemm", "attention", "qk_norm_rope", "rmsnorm",
                                         "glu", "embed", "pool", "cast"};

static double prof_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define PROF_CALL(i, call)                                                  \
    do {                                                                    \
        double t0_ = prof_now();                                            \
        rl_status st_ = call;                                               \
        impl_of(be)->prof_s[i] += prof_now() - t0_;                         \
        return st_;                                                         \
    } while (0)

static rl_status prof_gemm(rl_backend *be, const rl_segments *seg, const void *x, const void *w,
                           const void *bias, void *y, int64_t M, int64_t N, int64_t K, int acc)
{
    impl_of(be)->prof_gemm_flops += 2.0 * (double)M * (double)N * (double)K;
    PROF_CALL(0, cpu_gemm(be, seg, x, w, bias, y, M, N, K, acc));
}
static rl_status prof_attention(rl_backend *be, const rl_segments *seg, const void *qkv, void *out,
                                int64_t T, int64_t nh, int64_t nkv, int64_t hd, float scale,
                                int64_t window, float softcap)
{
    PROF_CALL(1, cpu_attention(be, seg, qkv, out, T, nh, nkv, hd, scale, window, softcap));
}
static rl_status prof_qk_norm_rope(rl_backend *be, const rl_segments *seg, void *qkv, int64_t T,
                                   int64_t nh, int64_t nkv, int64_t hd, const void *q_norm,
                                   const void *k_norm, int norm_mode, float w_offset, float eps,
                                   const float *inv_freq)
{
    PROF_CALL(2, cpu_qk_norm_rope(be, seg, qkv, T, nh, nkv, hd, q_norm, k_norm, norm_mode,
                                  w_offset, eps, inv_freq));
}
static rl_status prof_rmsnorm(rl_backend *be, const void *x, rl_dtype x_dtype, const void *w,
                              void *y, rl_dtype out_dtype, int64_t rows, int64_t d, float eps,
                              float w_offset, int accumulate)
{
    PROF_CALL(3, cpu_rmsnorm(be, x, x_dtype, w, y, out_dtype, rows, d, eps, w_offset, accumulate));
}
static rl_status prof_glu(rl_backend *be, const void *gu, void *out, int64_t T, int64_t ff, int act)
{
    PROF_CALL(4, cpu_glu(be, gu, out, T, ff, act));
}
static rl_status prof_embed(rl_backend *be, const int32_t *tokens, int64_t T, const void *table,
                            int64_t d, void *x, float scale)
{
    PROF_CALL(5, cpu_embed(be, tokens, T, table, d, x, scale));
}
static rl_status prof_pool(rl_backend *be, const void *x, rl_dtype src_dtype, int64_t d,
                           const int32_t *spans, int64_t S, rl_pool mode, float *out)
{
    PROF_CALL(6, cpu_pool(be, x, src_dtype, d, spans, S, mode, out));
}
static rl_status prof_cast(rl_backend *be, const void *src, rl_dtype src_dtype, void *dst,
                           rl_dtype dst_dtype, int64_t n)
{
    PROF_CALL(7, cpu_cast(be, src, src_dtype, dst, dst_dtype, n));
}

static void prof_report(const cpu_impl *im)
{
    double total = 0.0;
    for (int i = 0; i < 8; i++) total += im->prof_s[i];
    if (total <= 0.0) return;
    fprintf(stderr, "rjepa_latent CPU profile (%s): %.3f s in ops", im->kernel, total);
    for (int i = 0; i < 8; i++)
        fprintf(stderr, "; %s %.3f s (%.1f%%)", PROF_NAMES[i], im->prof_s[i],
                100.0 * im->prof_s[i] / total);
    fprintf(stderr, "; gemm %.1f GFLOP/s over %.2f GFLOP\n",
            im->prof_s[0] > 0 ? im->prof_gemm_flops / im->prof_s[0] * 1e-9 : 0.0,
            im->prof_gemm_flops * 1e-9);
}

/* ---- construction ------------------------------------------------------- */

/* fp32 storage only; attention and pooling take any (even) head_dim, any
 * number of heads and every pooling; every feature */
static const rl_backend_caps CPU_CAPS = {
    .dtypes = 1u << RL_F32,
    .poolings = (1u << RL_POOL_MEAN) | (1u << RL_POOL_FIRST) | (1u << RL_POOL_LAST) |
                (1u << RL_POOL_MAX),
    .head_dims = NULL, .n_head_dims = 0, .max_heads = 0,
    .features = (1u << RL_FEAT_COUNT) - 1u,
};

const rl_backend_caps *rl_cpu_caps(void) { return &CPU_CAPS; }

static void cpu_destroy(rl_backend *be)
{
    if (!be) return;
    cpu_impl *im = impl_of(be);
    if (im) {
        if (be->gemm == prof_gemm) prof_report(im);
        free(im->scores);
        free(im->sums);
        for (int i = 0; i < 2; i++) {
            free(im->rope[i].tab);
            free(im->rope[i].inv);
        }
        free(im->jobs);
        free(im);
    }
    free(be);
#ifdef __GLIBC__
    /* glibc keeps freed heap pages (its mmap threshold grows after the load's
     * temporaries are freed, so weights can land on the heap): hand them back
     * so that closing a model returns its memory to the OS */
    malloc_trim(0);
#endif
}

int rl_backend_cpu_threads(const rl_backend *be)
{
    return be && be->destroy == cpu_destroy ? ((const cpu_impl *)be->impl)->n_threads : 1;
}

rl_status rl_backend_cpu_create(int n_threads, rl_backend **out)
{
    *out = NULL;
    /* libgomp exits (or crashes) when it cannot create a requested team,
     * so an absurd thread count must be refused here, not attempted */
    if (n_threads < 0 || n_threads > RL_CPU_MAX_THREADS)
        return RL_FAIL(RL_ERR_INVALID, "n_threads must be in [0, %d] (0: one per core), got %d",
                       RL_CPU_MAX_THREADS, n_threads);
    if (n_threads == 0) {
#ifdef _OPENMP
        n_threads = omp_get_num_procs();
#else
        n_threads = 1;
#endif
    }
    rl_backend *be = calloc(1, sizeof *be);
    cpu_impl *im = calloc(1, sizeof *im);
    if (!be || !im) { free(be); free(im); return RL_FAIL(RL_ERR_NOMEM, "out of host memory"); }
    im->n_threads = n_threads;
#ifdef _OPENMP
    omp_set_num_threads(n_threads);
#endif
    char err[256];
    const char *gemm = getenv("RJEPA_GEMM");
    if (rl_gemm_isa_from_env(&im->isa, err, sizeof err) != 0) {
        free(be); free(im);
        return RL_FAIL(RL_ERR_INVALID, "%s", err);
    }
    if (gemm && *gemm && strcmp(gemm, "builtin") != 0 && strcmp(gemm, "openblas") != 0) {
        free(be); free(im);
        return RL_FAIL(RL_ERR_INVALID, "RJEPA_GEMM must be builtin (the default) or openblas, "
                       "got '%s'", gemm);
    }
    im->openblas = gemm && strcmp(gemm, "openblas") == 0;
#ifdef RL_BLAS_BUILTIN
    if (im->openblas) {
        free(be); free(im);
        return RL_FAIL(RL_ERR_INVALID, "RJEPA_GEMM=openblas, but this build links no OpenBLAS "
                       "(built with RJEPA_BLAS=builtin or without scipy-openblas32)");
    }
#else
    if (im->openblas) {
        /* all parallelism is OpenMP's: OpenBLAS runs inside our threads */
        scipy_openblas_set_num_threads(1);
        /* the core type is what OpenBLAS picked for this CPU (or OPENBLAS_CORETYPE):
         * another core type rounds GEMMs differently */
        snprintf(im->kernel, sizeof im->kernel, "%s; core %s", scipy_openblas_get_config(),
                 scipy_openblas_get_corename());
    }
#endif
    /* the own GEMM's bits depend on the operands alone (gemm_builtin.h), not on
     * the ISA that computes them, so the ISA is not part of the kernel's name */
    if (!im->openblas)
        snprintf(im->kernel, sizeof im->kernel,
                 "rjepa fp32 GEMM (fma, fixed summation order; avx512 = avx2 = generic)");
    *be = (rl_backend){
        .name = "cpu", .kernel = im->kernel, .weight_dtype = RL_F32, .act_dtype = RL_F32, .res_dtype = RL_F32,
        .impl = im, .alloc = cpu_alloc, .free = cpu_free, .host_alloc = cpu_alloc,
        .host_release = cpu_host_release, .upload = cpu_upload, .upload_i32 = cpu_upload_i32,
        .download_f32 = cpu_download_f32, .download_f32_async = cpu_download_f32,
        .sync = cpu_sync, .mem_info = cpu_mem_info,
        .is_resident = cpu_is_resident, .embed = cpu_embed, .rmsnorm = cpu_rmsnorm,
        .gemm = cpu_gemm, .qk_norm_rope = cpu_qk_norm_rope, .attention = cpu_attention,
        .glu = cpu_glu, .cast = cpu_cast, .pool = cpu_pool, .destroy = cpu_destroy, .caps = &CPU_CAPS,
    };
    if (!im->openblas) {   /* the own GEMM reads its weights packed once at load */
        be->gemm_row_align = rl_gemm_panel_width(im->isa);
        be->gemm_pack_rows = cpu_gemm_pack_rows;
    }
    const char *prof = getenv("RJEPA_CPU_PROFILE");
    if (prof && *prof && strcmp(prof, "0") != 0) {
        be->gemm = prof_gemm;
        be->attention = prof_attention;
        be->qk_norm_rope = prof_qk_norm_rope;
        be->rmsnorm = prof_rmsnorm;
        be->glu = prof_glu;
        be->embed = prof_embed;
        be->pool = prof_pool;
        be->cast = prof_cast;
    }
    *out = be;
    return RL_OK;
}
