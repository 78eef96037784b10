/* gemm_builtin.h - the plain-C fp32 GEMM of builds without OpenBLAS
 * (RL_BLAS_BUILTIN; see gemm_builtin.c). */
#ifndef RL_GEMM_BUILTIN_H
#define RL_GEMM_BUILTIN_H

#include <stdint.h>

/* Row-major C[M, N] = alpha * A[M, K] op(B) + beta * C, op(B) = B^T with B
 * [N, K] (transb = 1) or B [K, N] (transb = 0); lda/ldb/ldc are row strides.
 * beta == 0: C is only written. Every element is summed in fp32 over k in
 * increasing order, so its bits depend on its operands alone. n_threads > 1
 * splits column panels over OpenMP threads when not already inside a
 * parallel region. Returns 0, or -1 when its scratch could not be allocated
 * (C is then unspecified). */
int rl_gemm_builtin(int transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc,
                    int n_threads);

#endif /* RL_GEMM_BUILTIN_H */
