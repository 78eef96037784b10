// emu_cublas.cpp - the emulated device's stand-in for cuBLAS (RJEPA_CUDA=emu
// builds only): exactly the calls kernels/cuda_backend.c makes, served by
// rl_cublas_load in place of the dlopen()ed library.
//
// cublasGemmEx: column-major C = alpha op(A) op(B) + beta C with op N or T,
// leading dimensions, bf16 or f32 A / B / C and f32 compute. Products are
// summed in double and rounded once to f32, then to the output type (round
// to nearest even); beta == 0 does not read C (as cuBLAS: NaN in C does not
// leak). It runs in order on the handle's stream. Operands outside their
// cudaMalloc allocation are refused with a diagnostic (cuBLAS would fault).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda_internal.h"
#include "emu_internal.h"

struct rl_cublas_context {
    cudaStream_t stream = nullptr;
    void *workspace = nullptr;
    size_t workspace_bytes = 0;
    int math_mode = 0;
};

namespace {

enum {
    ST_SUCCESS = 0,
    ST_NOT_INITIALIZED = 1,
    ST_INVALID_VALUE = 7,
    ST_EXECUTION_FAILED = 13,
    ST_NOT_SUPPORTED = 15
};

float load_elem(const void *base, int type, size_t i)
{
    if (type == RL_CUDA_R_32F) {
        float f;
        std::memcpy(&f, (const char *)base + 4 * i, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, (const char *)base + 2 * i, 2);
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

void store_elem(void *base, int type, size_t i, float f)
{
    if (type == RL_CUDA_R_32F) {
        std::memcpy((char *)base + 4 * i, &f, 4);
        return;
    }
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fff
                                                 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    std::memcpy((char *)base + 2 * i, &h, 2);
}

size_t elem_bytes(int type) { return type == RL_CUDA_R_32F ? 4 : 2; }

// bytes a column-major rows x cols matrix with leading dimension ld spans
size_t span_bytes(int rows, int cols, int ld, int type)
{
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * elem_bytes(type);
}

rl_cublas_status st_create(rl_cublas_handle *h)
{
    if (!h) return ST_INVALID_VALUE;
    *h = new rl_cublas_context();
    return ST_SUCCESS;
}
rl_cublas_status st_destroy(rl_cublas_handle h)
{
    if (!h) return ST_NOT_INITIALIZED;
    delete h;
    return ST_SUCCESS;
}
rl_cublas_status st_set_stream(rl_cublas_handle h, cudaStream_t s)
{
    if (!h) return ST_NOT_INITIALIZED;
    h->stream = s;
    return ST_SUCCESS;
}
rl_cublas_status st_set_workspace(rl_cublas_handle h, void *ws, size_t bytes)
{
    if (!h) return ST_NOT_INITIALIZED;
    if (bytes && !rl_emu::device_range(ws, bytes)) return ST_INVALID_VALUE;
    h->workspace = ws;
    h->workspace_bytes = bytes;
    return ST_SUCCESS;
}
rl_cublas_status st_set_math_mode(rl_cublas_handle h, int mode)
{
    if (!h) return ST_NOT_INITIALIZED;
    // CUBLAS_DEFAULT_MATH 0, TENSOR_OP 1, PEDANTIC 2, TF32_TENSOR_OP 3, with the
    // DISALLOW_REDUCED_PRECISION_REDUCTION flag (16)
    if ((mode & ~16) < 0 || (mode & ~16) > 3) return ST_INVALID_VALUE;
    h->math_mode = mode;
    return ST_SUCCESS;
}
rl_cublas_status st_get_version(rl_cublas_handle h, int *version)
{
    if (!h) return ST_NOT_INITIALIZED;
    if (!version) return ST_INVALID_VALUE;
    *version = 0; // not a cuBLAS: the backend's kernel string says so
    return ST_SUCCESS;
}
const char *st_string(rl_cublas_status st)
{
    switch (st) {
    case ST_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case ST_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case ST_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case ST_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case ST_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

rl_cublas_status st_gemm_ex(rl_cublas_handle h, int transa, int transb, int m, int n, int k,
                            const void *alpha_p, const void *A, int Atype, int lda, const void *B,
                            int Btype, int ldb, const void *beta_p, void *C, int Ctype, int ldc,
                            int compute_type, int algo)
{
    if (!h) return ST_NOT_INITIALIZED;
    if ((transa != RL_CUBLAS_OP_N && transa != RL_CUBLAS_OP_T) ||
        (transb != RL_CUBLAS_OP_N && transb != RL_CUBLAS_OP_T) || m < 0 || n < 0 || k < 0 ||
        !alpha_p || !beta_p)
        return ST_INVALID_VALUE;
    const int a_rows = transa == RL_CUBLAS_OP_N ? m : k, a_cols = transa == RL_CUBLAS_OP_N ? k : m;
    const int b_rows = transb == RL_CUBLAS_OP_N ? k : n, b_cols = transb == RL_CUBLAS_OP_N ? n : k;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1))
        return ST_INVALID_VALUE;
    const bool bf16_in = Atype == RL_CUDA_R_16BF && Btype == RL_CUDA_R_16BF &&
                         (Ctype == RL_CUDA_R_16BF || Ctype == RL_CUDA_R_32F);
    const bool f32_in = Atype == RL_CUDA_R_32F && Btype == RL_CUDA_R_32F && Ctype == RL_CUDA_R_32F;
    if (!(bf16_in || f32_in) || compute_type != RL_CUBLAS_COMPUTE_32F ||
        (algo != RL_CUBLAS_GEMM_DEFAULT && algo != 99))
        return ST_NOT_SUPPORTED;
    if (m == 0 || n == 0) return ST_SUCCESS;
    const float alpha = *(const float *)alpha_p, beta = *(const float *)beta_p; // host pointer mode
    if ((k > 0 && (!rl_emu::device_range(A, span_bytes(a_rows, a_cols, lda, Atype)) ||
                   !rl_emu::device_range(B, span_bytes(b_rows, b_cols, ldb, Btype)))) ||
        !rl_emu::device_range(C, span_bytes(m, n, ldc, Ctype))) {
        rl_emu::report("cublasGemmEx(m=%d, n=%d, k=%d, lda=%d, ldb=%d, ldc=%d): an operand "
                       "reaches outside its device allocation", m, n, k, lda, ldb, ldc);
        return ST_INVALID_VALUE;
    }
    rl_emu::count_gemm();
    auto run = [=]() {
        // op(A) as m rows of k, op(B) as n columns of k: contiguous dot products
        std::vector<float> a((size_t)m * k), b((size_t)n * k);
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
                a[(size_t)i * k + p] = load_elem(A, Atype, transa == RL_CUBLAS_OP_N
                                                              ? (size_t)i + (size_t)p * lda
                                                              : (size_t)p + (size_t)i * lda);
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++)
                b[(size_t)j * k + p] = load_elem(B, Btype, transb == RL_CUBLAS_OP_N
                                                              ? (size_t)p + (size_t)j * ldb
                                                              : (size_t)j + (size_t)p * ldb);
#pragma omp parallel for schedule(static) if ((double)m * n * k > 1e6)
        for (int j = 0; j < n; j++) {
            const float *bj = &b[(size_t)j * k];
            for (int i = 0; i < m; i++) {
                const float *ai = &a[(size_t)i * k];
                double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                for (int p = 0; p < k; p++) acc += (double)ai[p] * (double)bj[p];
                const size_t ci = (size_t)i + (size_t)j * ldc;
                double v = (double)alpha * acc;
                if (beta != 0.0f) v += (double)beta * (double)load_elem(C, Ctype, ci);
                store_elem(C, Ctype, ci, (float)v);
            }
        }
    };
    if (!rl_emu::stream_push(h->stream, [run] { if (!rl_emu::faulted()) run(); }))
        return ST_EXECUTION_FAILED;
    return ST_SUCCESS;
}

} // namespace

extern "C" {

// The emulated build's cuBLAS: the stand-in above, never a library.
rl_status rl_cublas_load(rl_cublas_api *api)
{
    std::memset(api, 0, sizeof *api);
    std::snprintf(api->path, sizeof api->path, "%s", "the emulated device's CPU cuBLAS stand-in");
    api->create = st_create;
    api->destroy = st_destroy;
    api->set_stream = st_set_stream;
    api->set_workspace = st_set_workspace;
    api->set_math_mode = st_set_math_mode;
    api->gemm_ex = st_gemm_ex;
    api->status_string = st_string;
    api->get_version = st_get_version;
    return RL_OK;
}

void rl_cublas_unload(rl_cublas_api *api) { api->lib = nullptr; }

// cuBLAS's own entry points, for tests that call the stand-in directly
int cublasCreate_v2(rl_cublas_handle *h) { return st_create(h); }
int cublasDestroy_v2(rl_cublas_handle h) { return st_destroy(h); }
int cublasSetStream_v2(rl_cublas_handle h, cudaStream_t s) { return st_set_stream(h, s); }
int cublasSetMathMode(rl_cublas_handle h, int mode) { return st_set_math_mode(h, mode); }
int cublasGemmEx(rl_cublas_handle h, int transa, int transb, int m, int n, int k,
                 const void *alpha, const void *A, int Atype, int lda, const void *B, int Btype,
                 int ldb, const void *beta, void *C, int Ctype, int ldc, int compute_type, int algo)
{
    return st_gemm_ex(h, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
                      Ctype, ldc, compute_type, algo);
}

} // extern "C"
