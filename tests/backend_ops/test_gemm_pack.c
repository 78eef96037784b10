/* test_gemm_pack.c - the own GEMM with its weight packed ahead
 * (rl_gemm_pack_b / rl_gemm_pack_rows + rl_gemm_f32_packed) against the
 * same GEMM packing inside the call (rl_gemm_f32, transb = 1): bitwise equal
 * on every ISA this CPU runs, over odd shapes (N not a multiple of the panel
 * width, K = 0 and 1, M = 1, a bias, beta 0, 1 and otherwise, 1 and 3
 * threads); a weight packed in pieces (the parts of a fused matrix, any
 * order) equals one packed whole, padding included; every ISA gives the
 * same bits; and all of them equal a plain C loop in the contract's order
 * (fmaf over k from 0, then the epilogue), also for a K summed in blocks
 * (K at and around the block edges: RL_GEMM_KMIN, RL_GEMM_KC multiples).
 * Built with csrc/gemm_builtin.c alone (tests/test_cpu_gemm_isa.py).
 * Prints one line per ISA; exit status 0 when everything held. */
#include "gemm_builtin.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float uniform(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static float *randoms(size_t n)
{
    float *x = malloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = uniform();
    return x;
}

static int failures;

static void fail(const char *isa, const char *what, int64_t M, int64_t N, int64_t K, int bias,
                 float beta, int nt)
{
    if (failures++ < 20)
        printf("FAIL %s: %s at M=%lld N=%lld K=%lld bias=%d beta=%g threads=%d\n", isa, what,
               (long long)M, (long long)N, (long long)K, bias, beta, nt);
}

/* The contract's order, one element at a time (-ffp-contract=off). */
static void reference(int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                      const float *W, const float *bias, float beta, float *C)
{
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = fmaf(A[m * K + k], W[n * K + k], acc);
            float t = alpha * acc;
            if (bias) t = t + bias[n];
            float *c = C + m * N + n;
            *c = beta == 0.0f ? t : beta == 1.0f ? *c + t : beta * *c + t;
        }
}

int main(void)
{
    static const int64_t shapes[][3] = {
        {1, 1, 1},    {1, 33, 1},    {7, 17, 5},     {13, 70, 31},  {12, 32, 64},
        {25, 100, 577}, {200, 45, 3}, {193, 65, 129}, {1, 960, 576}, {5, 40, 0},
        {37, 3, 1536}, {400, 97, 96},
        /* K blocked (> RL_GEMM_KMIN) in ceil(K / RL_GEMM_KC) equal blocks, or just not */
        {13, 45, RL_GEMM_KMIN}, {13, 45, RL_GEMM_KMIN + 1}, {25, 40, 9 * RL_GEMM_KC},
        {200, 17, 9 * RL_GEMM_KC + 1}, {7, 33, 12 * RL_GEMM_KC - 1},
    };
    static const float betas[] = {0.0f, 1.0f, 0.5f};
    enum { NS = sizeof shapes / sizeof shapes[0] };
    float *first[NS][2][3] = {{{0}}};   /* the first ISA's results, for ISA vs ISA */
    for (int isa = RL_ISA_COUNT - 1; isa >= 0; isa--) {
        const char *name = rl_gemm_isa_name((rl_cpu_isa)isa);
        if (!rl_gemm_isa_available((rl_cpu_isa)isa)) {
            printf("%s: skipped (this CPU or build does not run it)\n", name);
            continue;
        }
        const int NR = rl_gemm_panel_width((rl_cpu_isa)isa);
        int cases = 0;
        for (int s = 0; s < NS; s++) {
            const int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
            rng = 0x9e3779b97f4a7c15ull + (uint64_t)s;   /* the same operands for every ISA */
            float *A = randoms((size_t)(M * K)), *W = randoms((size_t)(N * K));
            float *bias = randoms((size_t)N), *C0 = randoms((size_t)(M * N));
            const size_t pf = rl_gemm_packed_floats((rl_cpu_isa)isa, N, K);
            if (pf != (size_t)((N + NR - 1) / NR * NR) * (size_t)(K > 0 ? K : 1))
                fail(name, "rl_gemm_packed_floats", M, N, K, 0, 0, 0);
            float *whole = malloc(pf * 4), *pieces = malloc(pf * 4);
            for (size_t i = 0; i < pf; i++) whole[i] = pieces[i] = NAN;   /* padding must be zeroed */
            rl_gemm_pack_b((rl_cpu_isa)isa, N, K, W, K, whole);
            /* three pieces, last first, cut off the panel boundaries */
            int64_t c1 = N / 3, c2 = N - N / 4;
            rl_gemm_pack_rows((rl_cpu_isa)isa, N, K, c2, N - c2, W + c2 * K, K, pieces);
            rl_gemm_pack_rows((rl_cpu_isa)isa, N, K, 0, c1, W, K, pieces);
            rl_gemm_pack_rows((rl_cpu_isa)isa, N, K, c1, c2 - c1, W + c1 * K, K, pieces);
            if (memcmp(whole, pieces, pf * 4) != 0) fail(name, "packed in pieces", M, N, K, 0, 0, 0);
            for (size_t i = 0; i < pf; i++)
                if (isnan(whole[i])) {
                    fail(name, "an unwritten packed float", M, N, K, 0, 0, 0);
                    break;
                }
            for (int b = 0; b < 2; b++)
                for (int e = 0; e < 3; e++)
                    for (int nt = 1; nt <= 3; nt += 2) {
                        float *ref = malloc((size_t)(M * N) * 4), *got = malloc((size_t)(M * N) * 4);
                        memcpy(ref, C0, (size_t)(M * N) * 4);
                        memcpy(got, C0, (size_t)(M * N) * 4);
                        const float alpha = e == 2 ? 0.75f : 1.0f;
                        if (rl_gemm_f32((rl_cpu_isa)isa, 1, M, N, K, alpha, A, K, W, K,
                                        b ? bias : NULL, betas[e], ref, N, nt) != 0 ||
                            rl_gemm_f32_packed((rl_cpu_isa)isa, M, N, K, alpha, A, K, whole,
                                               b ? bias : NULL, betas[e], got, N, nt) != 0)
                            fail(name, "a GEMM failed", M, N, K, b, betas[e], nt);
                        else if (memcmp(ref, got, (size_t)(M * N) * 4) != 0)
                            fail(name, "packed ahead != packed in the call", M, N, K, b, betas[e], nt);
                        memcpy(ref, C0, (size_t)(M * N) * 4);
                        reference(M, N, K, alpha, A, W, b ? bias : NULL, betas[e], ref);
                        if (memcmp(ref, got, (size_t)(M * N) * 4) != 0)
                            fail(name, "not the plain loop's bits", M, N, K, b, betas[e], nt);
                        if (nt == 1 && !first[s][b][e]) first[s][b][e] = got;
                        else {
                            if (nt == 1 && memcmp(first[s][b][e], got, (size_t)(M * N) * 4) != 0)
                                fail(name, "not the bits of the first ISA", M, N, K, b, betas[e], nt);
                            free(got);
                        }
                        free(ref);
                        cases++;
                    }
            free(A); free(W); free(bias); free(C0); free(whole); free(pieces);
        }
        printf("%s: NR=%d, %d cases\n", name, NR, cases);
    }
    for (int s = 0; s < NS; s++)
        for (int b = 0; b < 2; b++)
            for (int e = 0; e < 3; e++) free(first[s][b][e]);
    printf("%s\n", failures ? "FAILED" : "OK");
    return failures ? 1 : 0;
}
