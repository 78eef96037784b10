/* engine.h - the plain-C core of rjepa_latent.
 *
 * The engine runs the decoder stack of a Llama / Mistral / Qwen2 / Qwen3 /
 * Gemma-2 / Gemma-3 / OLMo-2 model over a
 * packed batch of token sequences and returns hidden states of the requested
 * layers, pooled over token spans. It has no Python in it: the binding
 * (binding.c) is its only Python-facing file.
 *
 * Design choices:
 * - The forward pass (engine.c) is written once, over a backend op table
 *   (rl_backend). A CPU backend (fp32, OpenBLAS GEMM or the builtin C GEMM of
 *   gemm_builtin.c, ops_cpu.c) and a CUDA
 *   backend (bf16 storage, fp32 accumulation, the .cu files in kernels/;
 *   or all-fp32 when created with rl_backend_cuda_create_ex(.., RL_F32, ..))
 *   implement it.
 * - The caller supplies weights tensor by tensor (rl_model_set_tensor) from
 *   any host buffer (an mmap'd safetensors file, a dequantized GGUF tensor);
 *   the engine converts them into its own storage in one pass. Q/K/V and
 *   gate/up are stored fused so each is one GEMM.
 * - Every failure returns an rl_status and records a message (rl_last_error)
 *   and, apart from it, the file and line that recorded it
 *   (rl_last_error_where); nothing exits or aborts.
 * - Results live in memory allocated for them (rl_result; on CUDA a pinned
 *   block of a process-wide pool), never in reusable scratch, so the binding
 *   can hand them out zero-copy.
 * - A backend states what it supports (rl_backend_caps) before any weight is
 *   allocated; rl_model_create refuses a config it cannot run.
 * - max_tokens means one thing throughout (rl_model_reserve, rl_workspace,
 *   rl_workspace_bytes): the workspace capacity in tokens, i.e. the most
 *   tokens one forward takes; it is also how many spans are pooled at once
 *   (more are pooled in chunks of max_tokens).
 */
#ifndef RL_ENGINE_H
#define RL_ENGINE_H

/* The types and helpers every file shares (common.h) and the backends'
 * entry points; this header adds the model over them (engine.c). */
#include "common.h"
#include "cuda_entry.h"
#include "ops_cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- backends (engine.c) ---------------------------------------------- */

/* Capabilities of the backend device_index would create: -1 the CPU, >= 0
 * CUDA (needs no driver or device: it is what the compiled kernels support).
 * RL_ERR_DEVICE when CUDA is not built in. */
rl_status rl_backend_caps_get(int device_index, rl_backend_caps *out);
/* RL_OK if `caps` can run `cfg` with weights stored in `dtype`, else
 * RL_ERR_INVALID naming the unsupported value and the supported ones;
 * `who` ("cpu", "cuda:0") starts the message. */
rl_status rl_caps_check_config(const rl_backend_caps *caps, const char *who, const rl_config *cfg,
                               rl_dtype dtype);
/* The same for an existing backend (its caps and weight dtype). */
rl_status rl_backend_check_config(const rl_backend *be, const rl_config *cfg);

/* ---- model ------------------------------------------------------------ */

typedef struct rl_layer_weights {
    void *attn_norm;   /* [d] or NULL (no pre-norms)   weight_dtype          */
    void *wqkv;        /* [(nh+2nkv)*hd, d]     fused q,k,v rows             */
    void *bqkv;        /* [(nh+2nkv)*hd] or NULL                             */
    void *q_norm;      /* [hd] or [nh*hd] (qk_norm PROJ) or NULL             */
    void *k_norm;      /* [hd] or [nkv*hd] (qk_norm PROJ) or NULL            */
    void *wo;          /* [d, nh*hd]                                         */
    void *bo;          /* [d] or NULL                                        */
    void *ffn_norm;    /* [d] or NULL (no pre-norms)                         */
    void *wgu;         /* [2ff, d]              gate rows then up rows       */
    void *bgu;         /* [2ff] or NULL                                      */
    void *wdown;       /* [d, ff]                                            */
    void *bdown;       /* [d] or NULL                                        */
    void *post_attn_norm; /* [d] or NULL (no post-norms)                     */
    void *post_ffn_norm;  /* [d] or NULL (no post-norms)                     */
} rl_layer_weights;

typedef struct rl_weights {
    void *embed;                 /* [V, d]                                   */
    void *final_norm;            /* [d] or NULL when max_layer < L           */
    float *inv_freq;             /* [hd/2] f32 (backend memory)              */
    float *inv_freq_swa;         /* [hd/2] f32 for sliding layers, or NULL (no rope_swa) */
    rl_layer_weights *layers;    /* [loaded layers]                          */
    uint8_t *filled;             /* [RL_T_COUNT * (1 + loaded layers)] flags */
    size_t bytes;                /* backend bytes held by weights            */
} rl_weights;

typedef struct rl_workspace {
    int64_t max_tokens;          /* T: capacity in tokens (0: not reserved)  */
    void *x;                     /* [T, d]            res_dtype residual     */
    void *h;                     /* [T, max(d, ff)]   act_dtype normed / glu out */
    void *proj;                  /* [T, d]            act_dtype O / down output before
                                                      a post-norm, or NULL      */
    void *qkv;                   /* [T, (nh+2nkv)*hd] act_dtype              */
    void *attn;                  /* [T, nh*hd]        act_dtype              */
    void *gu;                    /* [T, 2ff]          act_dtype              */
    void *normed_out;            /* [T, d]            res_dtype final norm   */
    int32_t *tokens;             /* [T]                                      */
    int32_t *cu_seqlens;         /* [T+1]                                    */
    int32_t *positions;          /* [T]                                      */
    int32_t *spans;              /* [T, 2] absolute spans of one chunk of <= T */
    float *pooled;               /* [RL_POOLED_ROWS_PER_TOKEN * T, d] f32 pooled
                                    rows of a forward, downloaded together   */
    int64_t pooled_rows;         /* its capacity in rows                     */
    size_t bytes;                /* backend bytes held by the workspace      */
} rl_workspace;

typedef struct rl_model rl_model;

/* Takes ownership of `be` (also on failure). Validates cfg, checks it against
 * the backend's capabilities, then allocates every weight buffer. */
rl_status rl_model_create(const rl_config *cfg, rl_backend *be, rl_model **out);
/* The same, keeping the kinds in `keep` (bits 1u << rl_tensor_kind; see
 * qweights.h) in their stored quantized format: their dense buffers are not
 * allocated and they are handed over with rl_model_set_tensor_quantized. */
rl_status rl_model_create_kept(const rl_config *cfg, rl_backend *be, unsigned keep, rl_model **out);
/* Copies the stored bytes of one kept weight (a descriptor over host memory,
 * rows x cols = the kind's shape) into backend memory, after validating them. */
rl_status rl_model_set_tensor_quantized(rl_model *m, rl_tensor_kind kind, int64_t layer,
                                        const struct rl_qtensor_s *q);
/* Copies (converting) one tensor. `layer` is ignored for global kinds.
 * The shape must equal rl_tensor_shape's. */
rl_status rl_model_set_tensor(rl_model *m, rl_tensor_kind kind, int64_t layer, const void *src,
                              rl_dtype src_dtype, const int64_t *shape, int ndim);
/* Checks every needed tensor was set (names the first missing one). */
rl_status rl_model_check_complete(const rl_model *m);
/* (Re)allocates the workspace with a capacity of max_tokens tokens (1..2^30):
 * a forward takes batches of up to max_tokens tokens. */
rl_status rl_model_reserve(rl_model *m, int64_t max_tokens);
/* Runs the forward up to the deepest requested layer and pools: after each
 * requested layer, every span once per pooling. On success *res holds a
 * freshly allocated result [P, nl, S, d] (free with rl_result_free). */
rl_status rl_model_forward(rl_model *m, const rl_batch *batch, rl_result *res);
void rl_result_free(rl_result *res);
const rl_config *rl_model_config(const rl_model *m);
rl_backend *rl_model_backend(rl_model *m);
size_t rl_model_weight_bytes(const rl_model *m);
size_t rl_model_workspace_bytes(const rl_model *m);
int64_t rl_model_max_tokens(const rl_model *m);   /* workspace capacity in tokens (0: none) */
/* The largest OpenMP team a CPU dequantization of its kept weights ran on so
 * far (0: none yet; rl_qw_team). */
int rl_model_dequant_team(const rl_model *m);
/* RL_OK if every weight pointer is resident on the backend's device. */
rl_status rl_model_verify_resident(rl_model *m);
void rl_model_free(rl_model *m);

#ifdef __cplusplus
}
#endif
#endif /* RL_ENGINE_H */
