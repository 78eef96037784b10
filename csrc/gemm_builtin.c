/* gemm_builtin.c - the CPU backend's GEMM when the build has no OpenBLAS
 * (RJEPA_BLAS=builtin, or no scipy-openblas32 at build time: setup.py
 * defines RL_BLAS_BUILTIN and compiles this file's code only then).
 *
 * Design choices:
 * - Exact fp32 with one summation order: every output element is
 *   sum_{k=0..K-1} a[m,k] * b[k,n], multiplied and added in fp32 in
 *   increasing k (no FMA contraction: setup.py passes -ffp-contract=off), then
 *   alpha * sum (+ beta * c). Its bits therefore depend on the operands
 *   alone: not on M, N, the blocking, the thread count or which rows are
 *   packed with it, so packing and thread count are bitwise neutral by
 *   construction (ops_cpu.c keeps its per-sequence jobs all the same).
 * - Blocked for the cache and the vectorizer: a panel of NR columns of B is
 *   packed k-major ([K][NR], zero-padded), and MR rows of A are swept over it
 *   with an MR x NR accumulator tile; the j loop over the tile is what the
 *   compiler vectorizes (each lane is another output, so vectorizing does not
 *   reorder any sum).
 * - OpenMP over column panels only when called outside a parallel region
 *   with n_threads > 1 (ops_cpu.c calls it single-threaded from its own jobs).
 */
#include "gemm_builtin.h"

#ifdef RL_BLAS_BUILTIN

#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MR 4
#define NR 16
#define STACK_K 256          /* panels of K <= STACK_K live on the stack (16 KiB) */

/* Packs columns [n0, n0 + nr) of op(B) into P[K][NR], zero-padded to NR. */
static void pack_panel(float *P, const float *B, int64_t ldb, int transb, int64_t K, int64_t n0,
                       int64_t nr)
{
    for (int64_t k = 0; k < K; k++) {
        float *p = P + k * NR;
        if (transb)                                   /* B is [N, K]: column n is row n */
            for (int64_t j = 0; j < nr; j++) p[j] = B[(n0 + j) * ldb + k];
        else                                          /* B is [K, N] */
            memcpy(p, B + k * ldb + n0, (size_t)nr * sizeof(float));
        for (int64_t j = nr; j < NR; j++) p[j] = 0.0f;
    }
}

/* Wider vectors where the CPU has them (chosen at load time by ifunc). Every
 * clone performs the same IEEE operations per output in the same order (no
 * FMA: AVX2 does not imply it, and -ffp-contract=off), so all give the same
 * bits; only the number of outputs per instruction differs
 * (tests/test_core_builtin_gemm.py compares with a build without clones,
 * -DRL_NO_TILE_CLONES). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    !defined(RL_NO_TILE_CLONES)
#define RL_TILE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RL_TILE_CLONES
#endif

/* C[m0..m0+mr, n0..n0+nr) from A rows and a packed panel. */
RL_TILE_CLONES static void tile(const float *A, int64_t lda, const float *P, int64_t K,
                                int64_t m0, int64_t mr, int64_t n0, int64_t nr, float alpha,
                                float beta, float *C, int64_t ldc)
{
    float acc[MR][NR];
    memset(acc, 0, sizeof acc);
    if (mr == MR) {
        const float *a0 = A + m0 * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
        for (int64_t k = 0; k < K; k++) {
            const float *p = P + k * NR;
            const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
            for (int j = 0; j < NR; j++) {
                acc[0][j] += x0 * p[j];
                acc[1][j] += x1 * p[j];
                acc[2][j] += x2 * p[j];
                acc[3][j] += x3 * p[j];
            }
        }
    } else {
        for (int64_t i = 0; i < mr; i++) {
            const float *a = A + (m0 + i) * lda;
            for (int64_t k = 0; k < K; k++) {
                const float *p = P + k * NR;
                const float x = a[k];
                for (int j = 0; j < NR; j++) acc[i][j] += x * p[j];
            }
        }
    }
    for (int64_t i = 0; i < mr; i++) {
        float *c = C + (m0 + i) * ldc + n0;
        if (beta == 0.0f)                             /* C is not read (may hold NaN) */
            for (int64_t j = 0; j < nr; j++) c[j] = alpha * acc[i][j];
        else if (beta == 1.0f)
            for (int64_t j = 0; j < nr; j++) c[j] = c[j] + alpha * acc[i][j];
        else
            for (int64_t j = 0; j < nr; j++) c[j] = beta * c[j] + alpha * acc[i][j];
    }
}

int rl_gemm_builtin(int transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc,
                    int n_threads)
{
    if (M <= 0 || N <= 0) return 0;
    const int64_t panels = (N + NR - 1) / NR;
    int failed = 0;
#ifdef _OPENMP
    const int par = n_threads > 1 && panels > 1 && !omp_in_parallel() && M * N * K >= (1 << 18);
#else
    const int par = 0;
    (void)n_threads;
#endif
#pragma omp parallel num_threads(n_threads > 1 ? n_threads : 1) if (par) reduction(| : failed)
    {
        /* the panel: on the stack when small (attention's GEMMs, called per
         * head and block), else on the heap */
        float small[STACK_K * NR];
        float *P = K <= STACK_K ? small : malloc((size_t)K * NR * sizeof(float));
        if (!P) failed = 1;
        /* every thread reaches the worksharing loop, also one whose malloc failed */
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < panels; pi++) {
            if (!P) continue;
            const int64_t n0 = pi * NR, nr = N - n0 < NR ? N - n0 : NR;
            pack_panel(P, B, ldb, transb, K, n0, nr);
            for (int64_t m0 = 0; m0 < M; m0 += MR)
                tile(A, lda, P, K, m0, M - m0 < MR ? M - m0 : MR, n0, nr, alpha, beta, C, ldc);
        }
        if (P != small) free(P);
    }
    return failed ? -1 : 0;
}

#else  /* !RL_BLAS_BUILTIN: the CPU backend uses OpenBLAS */
typedef int rl_gemm_builtin_unused_; /* ISO C forbids an empty translation unit */
#endif
