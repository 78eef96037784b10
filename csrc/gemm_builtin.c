/* gemm_builtin.c - the engine's own fp32 GEMM (interface and exactness
 * contract: gemm_builtin.h). The CPU backend's default GEMM (RJEPA_GEMM
 * selects OpenBLAS instead where the build has it); always compiled.
 *
 * Design choices:
 * - One summation order per output element in every ISA: acc = fma(a, b,
 *   acc) over k in increasing order from 0, one rounding per step (AVX
 *   vfmadd, or fmaf in the fallback), then the same epilogue for all (in C,
 *   or the same operations in vector registers, masked to the tile). So
 *   results are bitwise independent of the ISA, the thread count, M (the
 *   engine can run a GEMM over a whole packed batch and stay batch
 *   invariant) and the blocking; an unavailable ISA falls back to the portable
 *   kernel with the same bits.
 * - GotoBLAS-style blocking, simplified: op(B) is in column panels [K][NR]
 *   (zero-padded), a group of panels at a time: packed by the caller once
 *   (rl_gemm_pack_b, a weight at load) or per call into thread scratch; each
 *   MR-row slice of A is swept over the group with an MR x NR register tile,
 *   so the A slice is reused from L1 across the group's panels. K up to
 *   RL_GEMM_KMIN: the tile holds the whole K sum. A longer K is summed in
 *   equal blocks of at most RL_GEMM_KC (k range [k0, k0 + kc) of a panel is
 *   contiguous: P + k0 * NR), looping per job: K block, row slice, panel; the
 *   group's B block (sized for L2) is reused across the slices, and between
 *   blocks the tile's fp32 sums go to a per-thread scratch and come back
 *   (exact, so the fma chain is unchanged); the epilogue runs after the last
 *   block only, so C (beta != 0) is read once as before.
 * - Threads take jobs of (panel group, MC rows) dynamically: no reduction is
 *   split, so the split never changes a bit.
 * - The micro-kernels use intrinsics under target attributes, chosen at run
 *   time, so one build runs on any x86-64 and uses what the CPU has.
 */
#define _POSIX_C_SOURCE 200809L   /* posix_memalign */
#include "gemm_builtin.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define RL_GEMM_X86 1
#include <immintrin.h>
#endif

#define MR_MAX 12
#define NR_MAX 32
#define GROUP_BYTES (384 * 1024)   /* B block of one group (K block x panels): about a fifth of L2 */
#define STACK_FLOATS 8192          /* packed panels this small live on the stack */
#define MC 192                     /* rows per job: a multiple of every MR */
#define JOBS_PER_THREAD 4

/* Where a tile goes and how (the epilogue): rows [0, mr) and columns
 * [0, nr) of C = beta * C + (alpha * tile + bias). */
typedef struct {
    float alpha, beta;
    const float *bias;   /* [nr] or NULL */
    float *C;
    int64_t ldc, mr, nr;
} epi_args;

/* A kernel sums k over [0, K) of its A and P: starting from zeros (in ==
 * NULL) or from the fp32 partial sums of the earlier K blocks (in, an MR x
 * NR tile); ending with the epilogue (out == NULL) or storing its sums to out
 * for the next block. Storing and reloading an fp32 sum is exact, so the fma
 * chain of every element is the unblocked one. */
typedef void (*kern_fn)(int64_t K, const float *A, int64_t lda, const float *P, const epi_args *e,
                        const float *in, float *out);

/* The epilogue in C: t = alpha * acc; t = t + bias; c = t | c + t | beta * c
 * + t, one rounding each (-ffp-contract=off). The vector kernels apply the
 * same operations, in the same order, to their registers. */
static void epilogue(const float *tile, int NR, const epi_args *e)
{
    for (int64_t i = 0; i < e->mr; i++) {
        const float *t = tile + i * NR;
        float *c = e->C + i * e->ldc;
        float v[NR_MAX];
        for (int64_t j = 0; j < e->nr; j++) v[j] = e->alpha * t[j];
        if (e->bias)
            for (int64_t j = 0; j < e->nr; j++) v[j] = v[j] + e->bias[j];
        if (e->beta == 0.0f)                          /* C is not read (may hold NaN) */
            for (int64_t j = 0; j < e->nr; j++) c[j] = v[j];
        else if (e->beta == 1.0f)
            for (int64_t j = 0; j < e->nr; j++) c[j] = c[j] + v[j];
        else
            for (int64_t j = 0; j < e->nr; j++) c[j] = e->beta * c[j] + v[j];
    }
}

/* ---- micro-kernels: sum_k A[i, k] * P[k][j], then the epilogue ----------- */

/* fmaf is one correctly rounded operation whatever computes it: libm's
 * software fmaf on CPUs without FMA, or (the "fma" clone, picked at load
 * time on x86-64) the compiler's vectorized vfmadd, so both clones give the
 * same bits. */
#if defined(RL_GEMM_X86) && defined(__linux__)
__attribute__((target_clones("fma", "default")))
#endif
static void kern_generic(int64_t K, const float *A, int64_t lda, const float *P, const epi_args *e,
                         const float *in, float *out)
{
    enum { MR = 4, NR = 16 };
    float acc[MR][NR];
    if (in) memcpy(acc, in, sizeof acc);
    else memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < K; k++) {
        const float *p = P + k * NR;
        for (int i = 0; i < MR; i++) {
            const float x = A[i * lda + k];
            for (int j = 0; j < NR; j++) acc[i][j] = fmaf(x, p[j], acc[i][j]);
        }
    }
    if (out) memcpy(out, acc, sizeof acc);
    else epilogue(&acc[0][0], NR, e);
}

#ifdef RL_GEMM_X86
/* The epilogue on one row of 8-lane vectors (AVX2) or 16-lane (AVX-512),
 * masked to the tile's nr columns: epilogue()'s operations, lane by lane. */
#define EPI_ROW(V, MUL, ADD, LOAD, STORE, acc0, acc1, c, b0, b1)                    \
    do {                                                                            \
        V v0_ = MUL(al, acc0), v1_ = MUL(al, acc1);                                 \
        if (e->bias) { v0_ = ADD(v0_, b0); v1_ = ADD(v1_, b1); }                    \
        if (e->beta == 1.0f) {                                                      \
            v0_ = ADD(LOAD(c, 0), v0_);                                             \
            v1_ = ADD(LOAD(c, 1), v1_);                                             \
        } else if (e->beta != 0.0f) {                                               \
            v0_ = ADD(MUL(bt, LOAD(c, 0)), v0_);                                    \
            v1_ = ADD(MUL(bt, LOAD(c, 1)), v1_);                                    \
        }                                                                           \
        STORE(c, 0, v0_);                                                           \
        STORE(c, 1, v1_);                                                           \
    } while (0)

__attribute__((target("avx2,fma"))) static void kern_avx2(int64_t K, const float *A, int64_t lda,
                                                           const float *P, const epi_args *e,
                                                           const float *in, float *out)
{
    /* 6 x 16: 12 accumulators, 2 B vectors, 1 broadcast of the 16 ymm */
    const float *a0 = A, *a1 = A + lda, *a2 = a1 + lda, *a3 = a2 + lda, *a4 = a3 + lda,
                *a5 = a4 + lda;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define TILE(i)                                                                             \
    c##i##0 = _mm256_loadu_ps(in + 16 * i), c##i##1 = _mm256_loadu_ps(in + 16 * i + 8);
    if (in) { TILE(0) TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) }
#undef TILE
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(P + k * 16), b1 = _mm256_loadu_ps(P + k * 16 + 8);
        __m256 x;
#define ROW(i)                                          \
        x = _mm256_broadcast_ss(a##i + k);              \
        c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0);      \
        c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
    if (out) {
#define TILE(i) _mm256_storeu_ps(out + 16 * i, c##i##0), _mm256_storeu_ps(out + 16 * i + 8, c##i##1);
        TILE(0) TILE(1) TILE(2) TILE(3) TILE(4) TILE(5)
#undef TILE
        return;
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32((int)e->nr), lane),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32((int)e->nr - 8), lane)};
    const __m256 al = _mm256_set1_ps(e->alpha), bt = _mm256_set1_ps(e->beta);
    const __m256 bb0 = e->bias ? _mm256_maskload_ps(e->bias, m[0]) : al;
    const __m256 bb1 = e->bias ? _mm256_maskload_ps(e->bias + 8, m[1]) : al;
#define LD(c, h) _mm256_maskload_ps((c) + 8 * (h), m[h])
#define ST(c, h, v) _mm256_maskstore_ps((c) + 8 * (h), m[h], v)
#define ROW(i)                                                                              \
    if (i < e->mr)                                                                          \
        EPI_ROW(__m256, _mm256_mul_ps, _mm256_add_ps, LD, ST, c##i##0, c##i##1,             \
                e->C + i * e->ldc, bb0, bb1);
    ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
#undef LD
#undef ST
}

__attribute__((target("avx512f"))) static void kern_avx512(int64_t K, const float *A, int64_t lda,
                                                            const float *P, const epi_args *e,
                                                            const float *in, float *out)
{
    /* 12 x 32: 24 accumulators, 2 B vectors, 1 broadcast of the 32 zmm */
    __m512 c[12][2];
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++)
        if (in) {
            c[i][0] = _mm512_loadu_ps(in + 32 * i);
            c[i][1] = _mm512_loadu_ps(in + 32 * i + 16);
        } else {
            c[i][0] = c[i][1] = _mm512_setzero_ps();
        }
    for (int64_t k = 0; k < K; k++) {
        const __m512 b0 = _mm512_loadu_ps(P + k * 32), b1 = _mm512_loadu_ps(P + k * 32 + 16);
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) {
            const __m512 x = _mm512_set1_ps(A[i * lda + k]);
            c[i][0] = _mm512_fmadd_ps(x, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(x, b1, c[i][1]);
        }
    }
    if (out) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) {
            _mm512_storeu_ps(out + 32 * i, c[i][0]);
            _mm512_storeu_ps(out + 32 * i + 16, c[i][1]);
        }
        return;
    }
    const int nr = (int)e->nr;
    const __mmask16 m[2] = {(__mmask16)(nr >= 16 ? 0xffffu : (1u << nr) - 1u),
                            (__mmask16)(nr >= 32 ? 0xffffu : nr > 16 ? (1u << (nr - 16)) - 1u : 0u)};
    const __m512 al = _mm512_set1_ps(e->alpha), bt = _mm512_set1_ps(e->beta);
    const __m512 bb0 = e->bias ? _mm512_maskz_loadu_ps(m[0], e->bias) : al;
    const __m512 bb1 = e->bias ? _mm512_maskz_loadu_ps(m[1], e->bias + 16) : al;
#define LD(c, h) _mm512_maskz_loadu_ps(m[h], (c) + 16 * (h))
#define ST(c, h, v) _mm512_mask_storeu_ps((c) + 16 * (h), m[h], v)
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++)
        if (i < e->mr)
            EPI_ROW(__m512, _mm512_mul_ps, _mm512_add_ps, LD, ST, c[i][0], c[i][1],
                    e->C + i * e->ldc, bb0, bb1);
#undef LD
#undef ST
}
#endif

static const struct kernel_info {
    const char *name;
    int mr, nr;
    kern_fn fn;
} KERNELS[RL_ISA_COUNT] = {
    [RL_ISA_GENERIC] = {"generic", 4, 16, kern_generic},
#ifdef RL_GEMM_X86
    [RL_ISA_AVX2] = {"avx2", 6, 16, kern_avx2},
    [RL_ISA_AVX512] = {"avx512", 12, 32, kern_avx512},
#else
    [RL_ISA_AVX2] = {"avx2", 0, 0, NULL},
    [RL_ISA_AVX512] = {"avx512", 0, 0, NULL},
#endif
};

const char *rl_gemm_isa_name(rl_cpu_isa isa)
{
    return (unsigned)isa < RL_ISA_COUNT ? KERNELS[isa].name : "unknown";
}

int rl_gemm_isa_available(rl_cpu_isa isa)
{
    switch (isa) {
    case RL_ISA_GENERIC: return 1;
#ifdef RL_GEMM_X86
    /* libgcc's checks include the OS saving the wider registers (XGETBV) */
    case RL_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case RL_ISA_AVX512: return __builtin_cpu_supports("avx512f");
#endif
    default: return 0;
    }
}

int rl_gemm_isa_from_env(rl_cpu_isa *isa, char *err, size_t cap)
{
    const char *want = getenv("RJEPA_CPU_ISA");
    if (want && *want) {
        for (int i = 0; i < RL_ISA_COUNT; i++)
            if (strcmp(want, KERNELS[i].name) == 0) {
                if (!rl_gemm_isa_available((rl_cpu_isa)i)) {
                    snprintf(err, cap, "RJEPA_CPU_ISA=%s, but this %s does not run %s code "
                             "(available here: %s%s%s)", want,
                             KERNELS[i].fn ? "CPU" : "build", want,
                             rl_gemm_isa_available(RL_ISA_AVX512) ? "avx512, " : "",
                             rl_gemm_isa_available(RL_ISA_AVX2) ? "avx2, " : "", "generic");
                    return -1;
                }
                *isa = (rl_cpu_isa)i;
                return 0;
            }
        snprintf(err, cap, "RJEPA_CPU_ISA must be avx512, avx2 or generic (or unset: the widest "
                 "this CPU runs), got '%s'", want);
        return -1;
    }
    *isa = rl_gemm_isa_available(RL_ISA_AVX512) ? RL_ISA_AVX512
         : rl_gemm_isa_available(RL_ISA_AVX2) ? RL_ISA_AVX2 : RL_ISA_GENERIC;
    return 0;
}

/* ---- driver ------------------------------------------------------------- */

/* Columns [n0, n0 + nr) of op(B) into P[K][NR], zero-padded to NR. */
static void pack_panel(float *P, int NR, const float *B, int64_t ldb, int transb, int64_t K,
                       int64_t n0, int64_t nr)
{
    if (transb) {                                     /* B is [N, K]: column n is row n */
        for (int64_t j = 0; j < nr; j++) {
            const float *b = B + (n0 + j) * ldb;
            for (int64_t k = 0; k < K; k++) P[k * NR + j] = b[k];
        }
    } else {                                          /* B is [K, N] */
        for (int64_t k = 0; k < K; k++) memcpy(P + k * NR, B + k * ldb + n0, (size_t)nr * 4);
    }
    if (nr < NR)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = nr; j < NR; j++) P[k * NR + j] = 0.0f;
}

/* The kernel an ISA runs here: an ISA this build or CPU lacks falls back to
 * the portable one (the same bits, slower); its NR is the packed layout's. */
static const struct kernel_info *kernel_of(rl_cpu_isa isa)
{
    if ((unsigned)isa >= RL_ISA_COUNT || !KERNELS[isa].fn || !rl_gemm_isa_available(isa))
        isa = RL_ISA_GENERIC;
    return &KERNELS[isa];
}

int rl_gemm_panel_width(rl_cpu_isa isa) { return kernel_of(isa)->nr; }

size_t rl_gemm_packed_floats(rl_cpu_isa isa, int64_t N, int64_t K)
{
    const int64_t NR = kernel_of(isa)->nr;
    return (size_t)((N + NR - 1) / NR * NR) * (size_t)(K > 0 ? K : 1);
}

void rl_gemm_pack_rows(rl_cpu_isa isa, int64_t N, int64_t K, int64_t r0, int64_t n,
                       const float *W, int64_t ldw, float *packed)
{
    if (n <= 0) return;
    const int NR = kernel_of(isa)->nr;
    const int64_t Kp = K > 0 ? K : 1, panel_floats = Kp * NR, last = (N - 1) / NR;
    for (int64_t r = r0; r < r0 + n;) {
        /* the rows of one panel: k outer, so the writes are contiguous */
        const int64_t p = r / NR, j0 = r % NR, nj = r0 + n - r < NR - j0 ? r0 + n - r : NR - j0;
        float *P = packed + p * panel_floats;
        const float *w = W + (r - r0) * ldw;
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < nj; j++) P[k * NR + j0 + j] = w[j * ldw + k];
        if (K == 0)
            for (int64_t j = 0; j < nj; j++) P[j0 + j] = 0.0f;
        if (p == last && N % NR)                      /* the padding columns: zeros */
            for (int64_t k = 0; k < Kp; k++)
                for (int64_t j = N % NR; j < NR; j++) P[k * NR + j] = 0.0f;
        r += nj;
    }
}

void rl_gemm_pack_b(rl_cpu_isa isa, int64_t N, int64_t K, const float *W, int64_t ldw,
                    float *packed)
{
    if (N > 0) rl_gemm_pack_rows(isa, N, K, 0, N, W, ldw, packed);
}

/* rl_gemm_f32 (B, ldb, transb: packed per group of panels into thread
 * scratch) and rl_gemm_f32_packed (pre: the whole packed op(B), read in
 * place): the same jobs, the same kernels, so the same bits. */
static int gemm_driver(rl_cpu_isa isa, int transb, int64_t M, int64_t N, int64_t K, float alpha,
                       const float *A, int64_t lda, const float *B, int64_t ldb, const float *pre,
                       const float *bias, float beta, float *C, int64_t ldc, int n_threads)
{
    if (M <= 0 || N <= 0) return 0;
    const struct kernel_info *ki = kernel_of(isa);
    const int MR = ki->mr, NR = ki->nr;
    const int64_t Kp = K > 0 ? K : 1;                 /* K == 0: tiles of zeros */
    const int64_t panels = (N + NR - 1) / NR, panel_floats = Kp * NR;
#ifdef _OPENMP
    const int nt = n_threads > 1 && !omp_in_parallel() && (panels > 1 || M > MC) &&
                   M * N * K >= (1 << 18) ? n_threads : 1;
#else
    const int nt = 1;
    (void)n_threads;
#endif
    /* K blocks: for K > RL_GEMM_KMIN, the k range is cut into equal blocks
     * of at most RL_GEMM_KC; a job runs block by block, so the group's B block
     * (G x kc x NR) stays in L2 across the job's row slices and each slice's A
     * block in L1 across the group's panels. */
    const int64_t nkb = K > RL_GEMM_KMIN ? (K + RL_GEMM_KC - 1) / RL_GEMM_KC : 1;
    const int64_t kc = (Kp + nkb - 1) / nkb;
    const int blocked = kc < Kp;
    /* jobs: a group of panels (a B block fitting GROUP_BYTES) times a chunk
     * of MC rows; at least JOBS_PER_THREAD per thread, taken dynamically, so
     * a thread slowed by other processes does not hold the rest up (which
     * thread computes what never changes a bit) */
    int64_t fit = GROUP_BYTES / (kc * NR * 4);
    if (fit < 1) fit = 1;
    const int64_t mchunks = (M + MC - 1) / MC;
    int64_t want_groups = ((int64_t)nt * JOBS_PER_THREAD + mchunks - 1) / mchunks;
    int64_t G = (panels + want_groups - 1) / want_groups;
    if (G > fit) G = fit;
    if (G < 1) G = 1;
    const int64_t groups = (panels + G - 1) / G, jobs = groups * mchunks;
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
    {
        float stack_p[STACK_FLOATS] __attribute__((aligned(64)));
        float stack_a[MR_MAX * 256] __attribute__((aligned(64)));
        const size_t p_floats = pre ? 0 : (size_t)(G * panel_floats), a_floats = (size_t)(MR * kc);
        /* the partial sums of a job's tiles between K blocks */
        const size_t t_floats = blocked ? (size_t)(MC * G * NR) : 0;
        float *P = stack_p, *Ab = stack_a, *T = NULL;
        if (p_floats > STACK_FLOATS && posix_memalign((void **)&P, 64, p_floats * 4) != 0)
            P = NULL;
        if (a_floats > sizeof stack_a / 4 && posix_memalign((void **)&Ab, 64, a_floats * 4) != 0)
            Ab = NULL;
        if (t_floats && posix_memalign((void **)&T, 64, t_floats * 4) != 0) T = NULL;
        const int ok = P && Ab && (T || !blocked);
        if (!ok) failed = 1;
        int64_t packed = -1;                          /* the group P holds */
        /* every thread reaches the worksharing loop, also one without scratch */
#pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < jobs; job++) {
            if (!ok) continue;
            const int64_t g = job / mchunks, p0 = g * G, np = panels - p0 < G ? panels - p0 : G;
            const float *Pg = pre ? pre + p0 * panel_floats : P;
            if (!pre && g != packed) {
                for (int64_t q = 0; q < np; q++) {
                    const int64_t n0 = (p0 + q) * NR;
                    pack_panel(P + q * panel_floats, NR, B, ldb, transb, K, n0,
                               N - n0 < NR ? N - n0 : NR);
                    if (K == 0) memset(P + q * panel_floats, 0, (size_t)NR * 4);
                }
                packed = g;
            }
            const int64_t m_beg = job % mchunks * MC;
            const int64_t m_end = m_beg + MC < M ? m_beg + MC : M;
            for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
                const int64_t kl = Kp - k0 < kc ? Kp - k0 : kc;
                for (int64_t m0 = m_beg; m0 < m_end; m0 += MR) {
                    const int64_t mr = m_end - m0 < MR ? m_end - m0 : MR;
                    const float *a = A + m0 * lda + k0;
                    int64_t la = lda;
                    if (mr < MR || K == 0) {            /* a zero-padded copy of the last rows */
                        const int64_t kn = K - k0 < kl ? K - k0 : kl;
                        memset(Ab, 0, a_floats * 4);
                        for (int64_t i = 0; i < mr; i++)
                            memcpy(Ab + i * kl, a + i * lda, (size_t)kn * 4);
                        a = Ab;
                        la = kl;
                    }
                    float *tiles = T ? T + (m0 - m_beg) / MR * (G * MR * NR) : NULL;
                    for (int64_t q = 0; q < np; q++) {
                        const int64_t n0 = (p0 + q) * NR, nr = N - n0 < NR ? N - n0 : NR;
                        const epi_args e = {alpha, beta, bias ? bias + n0 : NULL,
                                            C + m0 * ldc + n0, ldc, mr, nr};
                        float *t = tiles ? tiles + q * (MR * NR) : NULL;
                        ki->fn(kl, a, la, Pg + q * panel_floats + k0 * NR, &e,
                               k0 > 0 ? t : NULL, k0 + kl < Kp ? t : NULL);
                    }
                }
            }
        }
        if (P != stack_p) free(P);
        if (Ab != stack_a) free(Ab);
        free(T);
    }
    return failed ? -1 : 0;
}

int rl_gemm_f32(rl_cpu_isa isa, int transb, int64_t M, int64_t N, int64_t K, float alpha,
                const float *A, int64_t lda, const float *B, int64_t ldb, const float *bias,
                float beta, float *C, int64_t ldc, int n_threads)
{
    return gemm_driver(isa, transb, M, N, K, alpha, A, lda, B, ldb, NULL, bias, beta, C, ldc,
                       n_threads);
}

int rl_gemm_f32_packed(rl_cpu_isa isa, int64_t M, int64_t N, int64_t K, float alpha,
                       const float *A, int64_t lda, const float *packed, const float *bias,
                       float beta, float *C, int64_t ldc, int n_threads)
{
    return gemm_driver(isa, 1, M, N, K, alpha, A, lda, NULL, 0, packed, bias, beta, C, ldc,
                       n_threads);
}

int rl_gemm_builtin(int transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc,
                    int n_threads)
{
    rl_cpu_isa isa;
    char err[160];
    if (rl_gemm_isa_from_env(&isa, err, sizeof err) != 0)   /* the widest */
        isa = rl_gemm_isa_available(RL_ISA_AVX512) ? RL_ISA_AVX512
            : rl_gemm_isa_available(RL_ISA_AVX2) ? RL_ISA_AVX2 : RL_ISA_GENERIC;
    return rl_gemm_f32(isa, transb, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc, n_threads);
}
