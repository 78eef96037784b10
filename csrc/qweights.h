/* qweights.h - a model's weight matrices kept in their stored quantized
 * format (quant.h) in backend memory, dequantized into one reusable scratch
 * just before each GEMM that reads them.
 *
 * Which kinds are kept is fixed when the model is created (a bit mask of
 * 1u << rl_tensor_kind over q, k, v, o, gate, up, down, embed); a kept kind
 * is kept in every loaded layer and its dense buffer is never allocated.
 * Q/K/V and gate/up are fused matrices of the engine: each part is its own
 * quantized tensor (they may differ in type) dequantized into consecutive
 * rows of the scratch, so the GEMM reads the same [rows, cols] matrix as
 * without keeping, in the same layout (the CPU's packed panels, or
 * row-major). The scratch is in the backend's weight dtype (fp32 on the
 * CPU, bf16 on CUDA) and holds the largest kept matrix. */
#ifndef RL_QWEIGHTS_H
#define RL_QWEIGHTS_H

#include "common.h"
#include "quant.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The kinds that may be kept. */
#define RL_QW_KEEPABLE ((1u << RL_T_EMBED) | (1u << RL_T_Q) | (1u << RL_T_K) | (1u << RL_T_V) | \
                        (1u << RL_T_O) | (1u << RL_T_GATE) | (1u << RL_T_UP) | (1u << RL_T_DOWN))

typedef struct rl_qweights rl_qweights;

/* RL_OK when `kinds` is a valid keep mask (keepable kinds only; q, k, v all
 * or none; gate, up both or none), else RL_ERR_INVALID naming the problem. */
rl_status rl_qw_check_kinds(unsigned kinds);
/* Bytes of the dense buffers a keep mask leaves unallocated, in weight_dtype,
 * GEMM weights padded to gemm_row_align rows (rl_backend_gemm_row_align). */
size_t rl_qw_dense_bytes_kept(const rl_config *cfg, unsigned kinds, rl_dtype weight_dtype,
                              int64_t gemm_row_align);
/* Bytes of the dequantization scratch of a keep mask (0 when nothing is
 * kept): the largest kept matrix in the backend's GEMM layout. */
size_t rl_qw_scratch_bytes(const rl_config *cfg, unsigned kinds, rl_dtype weight_dtype,
                           int64_t gemm_row_align);

/* Allocates the table and the scratch; kinds == 0 gives *out = NULL. */
rl_status rl_qw_create(rl_backend *be, const rl_config *cfg, int64_t n_loaded, unsigned kinds,
                       rl_qweights **out);
void rl_qw_free(rl_qweights *qw, rl_backend *be);
/* 1 when `kind` is kept. */
int rl_qw_keeps(const rl_qweights *qw, rl_tensor_kind kind);
/* Validates `host` (a descriptor over host memory, rows x cols = the kind's
 * shape) and copies its bytes into backend memory; *bytes_added is what it
 * took. `name` names the tensor in messages. */
rl_status rl_qw_set(rl_qweights *qw, rl_backend *be, rl_tensor_kind kind, int64_t layer,
                    const rl_qtensor *host, const char *name, size_t *bytes_added);
/* The dense [rows, cols] weight of the fused matrix that starts with `first`
 * (RL_T_Q: q, k, v; RL_T_GATE: gate, up; RL_T_O; RL_T_DOWN) of `layer`: when
 * kept, dequantized into the scratch and *w points at it; else *w = dense. */
rl_status rl_qw_matrix(rl_qweights *qw, rl_backend *be, int64_t layer, rl_tensor_kind first,
                       const void *dense, const void **w);
/* x[t, :] = embed[tokens[t], :] * scale (res_dtype) from the kept embedding;
 * tokens_host and tokens_dev are the same ids on the host and in backend memory. */
rl_status rl_qw_embed(rl_qweights *qw, rl_backend *be, const int32_t *tokens_host,
                      const int32_t *tokens_dev, int64_t T, int64_t d, void *x, float scale);
/* RL_OK when every stored part and the scratch are memory of `be`'s device. */
rl_status rl_qw_verify_resident(const rl_qweights *qw, rl_backend *be);
/* Stored bytes and scratch bytes held now. */
size_t rl_qw_stored_bytes(const rl_qweights *qw);
size_t rl_qw_scratch_held(const rl_qweights *qw);
/* The largest OpenMP team a CPU dequantization of this table ran on so far
 * (0: none yet): the backend's thread count, whatever the process default. */
int rl_qw_team(const rl_qweights *qw);

#ifdef __cplusplus
}
#endif
#endif /* RL_QWEIGHTS_H */
