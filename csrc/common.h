/* common.h - the types every file of the core shares, and the helpers on them.
 *
 * The bottom of csrc/: status codes and errors, dtypes, the model
 * configuration, tensor kinds, poolings, a packed batch and its result, the
 * backend op table and its capabilities (engine.h says how they fit
 * together), and what common.c defines: errors, dtype conversions (exact for
 * bf16/f16 -> f32, round-to-nearest-even for f32 -> bf16), tensor kind and
 * pooling names (the same strings the binding accepts), config validation
 * and byte counts. It includes no other header of the core, so every file
 * can use it: engine.h (the model, over the backends) sits on top of it.
 */
#ifndef RL_COMMON_H
#define RL_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status and errors ------------------------------------------------ */

typedef enum {
    RL_OK = 0,
    RL_ERR_INVALID = 1,      /* bad argument: ids, spans, layers, shapes    */
    RL_ERR_NOMEM = 2,        /* host allocation failed                      */
    RL_ERR_DEVICE = 3,       /* no usable device / not compiled in / driver */
    RL_ERR_DEVICE_MEMORY = 4,/* not enough device memory                    */
    RL_ERR_CUDA = 5,         /* a CUDA runtime call or kernel launch failed */
    RL_ERR_BLAS = 6,         /* cuBLAS failed                               */
    RL_ERR_STATE = 7         /* API misuse: missing tensor, not finalized   */
} rl_status;

/* Records a formatted message for the calling thread; returns `st`. */
rl_status rl_error_set(rl_status st, const char *file, int line, const char *fmt, ...);
/* Message of the last error recorded on this thread ("" if none). */
const char *rl_last_error(void);
/* Where it was recorded, "file.c:line" ("" if none): for bug reports. */
const char *rl_last_error_where(void);

#define RL_FAIL(st, ...) rl_error_set((st), __FILE__, __LINE__, __VA_ARGS__)
/* Propagate a failing rl_status unchanged (message already recorded). */
#define RL_TRY(expr) do { rl_status rl_try_st_ = (expr); if (rl_try_st_ != RL_OK) return rl_try_st_; } while (0)

/* ---- element types ---------------------------------------------------- */

typedef enum { RL_F32 = 0, RL_BF16 = 1, RL_F16 = 2 } rl_dtype;
size_t rl_dtype_size(rl_dtype dt);

/* ---- model configuration ---------------------------------------------- */

/* Activation of the gated MLP: out = act(gate) * up. */
typedef enum {
    RL_ACT_SILU = 0,       /* silu(g) = g / (1 + exp(-g)): SwiGLU (Llama, Qwen, OLMo-2) */
    RL_ACT_GELU_TANH = 1,  /* 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))): GeGLU (Gemma) */
    RL_ACT_COUNT
} rl_act;

/* Where q/k RMSNorm (before RoPE) is applied. */
typedef enum {
    RL_QK_NORM_NONE = 0,
    RL_QK_NORM_HEAD = 1,   /* per head, weights [hd] (Qwen3, Gemma-3)                     */
    RL_QK_NORM_PROJ = 2    /* over the whole q / k projection row, weights [nh*hd] /
                              [nkv*hd], before the head split (OLMo-2)                     */
} rl_qk_norm;

/* Where a layer's RMSNorms sit around attention and the MLP (f). */
typedef enum {
    RL_NORMS_PRE = 0,      /* x += f(norm(x))                 attn_norm, ffn_norm (Llama)  */
    RL_NORMS_PRE_POST = 1, /* x += post_norm(f(norm(x)))      + post_attn_norm, post_ffn_norm
                              (Gemma-2/3)                                                   */
    RL_NORMS_POST = 2      /* x += post_norm(f(x))            post_attn_norm, post_ffn_norm only
                              (OLMo-2)                                                      */
} rl_norms;

/* Most decoder layers a config with a sliding window describes
 * (rl_config.layer_sliding); rl_config_validate refuses more. */
#define RL_MAX_LAYERS 512

typedef struct {
    int64_t vocab_size;        /* V                                          */
    int64_t hidden_size;       /* d                                          */
    int64_t intermediate_size; /* ff                                         */
    int64_t num_layers;        /* L: decoder layers of the checkpoint        */
    int64_t num_heads;         /* nh                                         */
    int64_t num_kv_heads;      /* nkv (GQA: nh % nkv == 0)                   */
    int64_t head_dim;          /* hd (even)                                  */
    int64_t max_layer;         /* deepest hidden-state index that may be
                                  requested, 0..L; layers >= max_layer (and
                                  the final norm unless max_layer == L) are
                                  never loaded                               */
    double rms_norm_eps;
    int attn_qkv_bias;         /* q/k/v projections have biases (Qwen2)      */
    int attn_o_bias;           /* o projection has a bias (Llama attention_bias) */
    int mlp_bias;              /* gate/up/down have biases (Llama mlp_bias)  */
    int qk_norm;               /* rl_qk_norm: q/k RMSNorm before RoPE        */
    /* Variants of the Llama block; all zeros is Llama. */
    float embed_scale;         /* x = embed[token] * embed_scale; 0: no scaling
                                  (Gemma: sqrt(d) as a float, what HF multiplies
                                  fp32 weights by; HF on bf16 weights rounds it
                                  to bf16 first)                             */
    float norm_offset;         /* every RMSNorm (layer, q/k, final) multiplies by
                                  (norm_offset + w): 0, or 1 for Gemma's (1 + w) */
    int act;                   /* rl_act of the gated MLP                    */
    int norms;                 /* rl_norms: pre-, pre+post- or post-norms   */
    float attn_scale;          /* score scale; 0: 1/sqrt(hd) (Gemma:
                                  query_pre_attn_scalar^-0.5)                 */
    float attn_softcap;        /* s = cap * tanh(s / cap) after scaling; 0: none */
    int64_t sliding_window;    /* W > 0: in a sliding layer query i sees keys j
                                  with i - W < j <= i; 0: none                 */
    uint8_t layer_sliding[RL_MAX_LAYERS]; /* [L] 1: layer l uses the window
                                  (read only when sliding_window > 0, which
                                  needs L <= RL_MAX_LAYERS)                  */
    int rope_swa;              /* 1: sliding layers rotate with
                                  RL_T_ROPE_INV_FREQ_SWA (Gemma-3's local base) */
} rl_config;

/* Features beyond the Llama block that a config uses and a backend states
 * it runs (rl_backend_caps.features): bits 1u << rl_feature. */
typedef enum {
    RL_FEAT_EMBED_SCALE = 0,   /* embed_scale != 0                              */
    RL_FEAT_NORM_OFFSET,       /* norm_offset != 0                              */
    RL_FEAT_GELU_TANH,         /* act == RL_ACT_GELU_TANH                       */
    RL_FEAT_POST_NORMS,        /* norms != RL_NORMS_PRE                         */
    RL_FEAT_NO_PRE_NORMS,      /* norms == RL_NORMS_POST (needs the cast op)    */
    RL_FEAT_QK_NORM_PROJ,      /* qk_norm == RL_QK_NORM_PROJ                    */
    RL_FEAT_SOFTCAP,           /* attn_softcap != 0                             */
    RL_FEAT_SLIDING_WINDOW,    /* sliding_window > 0 on some layer              */
    RL_FEAT_ROPE_SWA,          /* rope_swa                                      */
    RL_FEAT_COUNT
} rl_feature;
/* The rl_feature bits `cfg` uses. */
unsigned rl_config_features(const rl_config *cfg);
/* "embed_scale", "norm_offset", ... (the config field that needs it). */
const char *rl_feature_name(int feature);

/* Which tensor rl_model_set_tensor fills. Shapes are the HF ones. */
typedef enum {
    RL_T_EMBED = 0,        /* [V, d]                         global        */
    RL_T_FINAL_NORM,       /* [d]            only when max_layer == L      */
    RL_T_ROPE_INV_FREQ,    /* [hd/2]   f32; caller computes (llama3 etc.)  */
    RL_T_ATTN_NORM,        /* [d]            pre-norms       per layer     */
    RL_T_Q,                /* [nh*hd, d]                                   */
    RL_T_K,                /* [nkv*hd, d]                                  */
    RL_T_V,                /* [nkv*hd, d]                                  */
    RL_T_Q_BIAS,           /* [nh*hd]        attn_qkv_bias                 */
    RL_T_K_BIAS,           /* [nkv*hd]       attn_qkv_bias                 */
    RL_T_V_BIAS,           /* [nkv*hd]       attn_qkv_bias                 */
    RL_T_Q_NORM,           /* [hd] (qk_norm HEAD) or [nh*hd] (PROJ)        */
    RL_T_K_NORM,           /* [hd] (qk_norm HEAD) or [nkv*hd] (PROJ)       */
    RL_T_O,                /* [d, nh*hd]                                   */
    RL_T_O_BIAS,           /* [d]            attn_o_bias                   */
    RL_T_FFN_NORM,         /* [d]            pre-norms                     */
    RL_T_GATE,             /* [ff, d]                                      */
    RL_T_UP,               /* [ff, d]                                      */
    RL_T_DOWN,             /* [d, ff]                                      */
    RL_T_GATE_BIAS,        /* [ff]           mlp_bias                      */
    RL_T_UP_BIAS,          /* [ff]           mlp_bias                      */
    RL_T_DOWN_BIAS,        /* [d]            mlp_bias                      */
    RL_T_ROPE_INV_FREQ_SWA,/* [hd/2]   f32   global, rope_swa: sliding layers */
    RL_T_POST_ATTN_NORM,   /* [d]            post-norms                    */
    RL_T_POST_FFN_NORM,    /* [d]            post-norms                    */
    RL_T_COUNT
} rl_tensor_kind;

/* Expected shape of a tensor kind under `cfg` (ndim 1 or 2); 0 if the kind
 * is not used by this config (e.g. Q_BIAS without attn_qkv_bias). */
int rl_tensor_shape(const rl_config *cfg, rl_tensor_kind kind, int64_t shape[2]);
/* Number of decoder layers that are loaded and run: min(max_layer, L). */
int64_t rl_config_loaded_layers(const rl_config *cfg);

/* ---- pooling ---------------------------------------------------------- */

typedef enum {
    RL_POOL_MEAN = 0,   /* mean of the span's rows, accumulated in >= f32              */
    RL_POOL_FIRST = 1,  /* the span's first row                                        */
    RL_POOL_LAST = 2,   /* the span's last row                                         */
    RL_POOL_MAX = 3,    /* elementwise maximum of the span's rows (a NaN propagates)   */
    RL_POOL_COUNT
} rl_pool;
/* Most poolings one forward computes (rl_batch.n_poolings). */
#define RL_MAX_POOLINGS 16
/* Pooling "none" is expressed by the caller as one [t, t+1) span per token
 * with RL_POOL_FIRST, so the engine has one output path. */

/* ---- a packed batch and its result ------------------------------------ */

typedef struct {
    const int32_t *tokens;      /* [T] token ids, sequences back to back     */
    int64_t n_tokens;           /* T                                         */
    const int32_t *cu_seqlens;  /* [B+1] start offsets, cu[0]=0, cu[B]=T     */
    int64_t n_seqs;             /* B                                         */
    const int32_t *layers;      /* [nl] hidden-state indices, each 0..max_layer
                                   (already resolved from negatives), or
                                   sites of a block (codes < 0, sites.h)     */
    int64_t n_layers;           /* nl                                        */
    const int32_t *spans;       /* [S, 2] [start, end) relative to the span's
                                   own sequence                              */
    const int32_t *span_seq;    /* [S] sequence index of each span           */
    int64_t n_spans;            /* S                                         */
    const rl_pool *poolings;    /* [P] each span is pooled once per entry, in
                                   this order, over each requested layer     */
    int64_t n_poolings;         /* P, 1..RL_MAX_POOLINGS                     */
} rl_batch;

typedef struct {
    float *data;                /* [P, nl, S, d] f32, owned by the result; with
                                   sites, per pooling and output [S, width]
                                   (sites.h: rl_output_width)                */
    int64_t n_poolings, n_layers, n_spans, hidden;
    void (*release)(void *data);/* frees data; needs neither the model nor its
                                   backend, so a result outlives both       */
} rl_result;

/* ---- the backend op table --------------------------------------------- */

/* Activation buffers come in two kinds: the residual stream (res_dtype,
 * f32 on both backends, so the sum of many layers keeps precision) and GEMM
 * operands (act_dtype: f32 on CPU, bf16 on CUDA). Weights are stored in
 * weight_dtype. Every pointer below is a backend (device) pointer unless it
 * says host. `seqs` is the packed batch's [B+1] offsets on the host (the CPU
 * backend's OpenBLAS mode runs GEMMs per sequence with them, so packing stays
 * bitwise neutral; its own GEMM is neutral by construction). */
typedef struct rl_segments {
    const int32_t *cu_seqlens_host; /* [B+1]                                 */
    const int32_t *cu_seqlens_dev;  /* [B+1] backend copy                    */
    const int32_t *positions_dev;   /* [T] position within own sequence      */
    int64_t n_seqs;
    int64_t max_seqlen;
} rl_segments;

/* What a backend can run, known without a device and before any weight is
 * allocated: rl_model_create checks a config against it first
 * (rl_backend_check_config), so an unsupported model fails at once naming
 * what is unsupported and what is. */
typedef struct rl_backend_caps {
    unsigned dtypes;            /* storage dtypes it can be created with: bits 1u << rl_dtype */
    unsigned poolings;          /* bits 1u << rl_pool                               */
    const int16_t *head_dims;   /* head dims the attention kernel runs, ascending;
                                   NULL: any even head_dim                          */
    int n_head_dims;
    int64_t max_heads;          /* most query heads per layer; 0: no limit          */
    unsigned features;          /* bits 1u << rl_feature it runs                    */
} rl_backend_caps;

struct rl_qtensor_s;   /* quant.h */
typedef struct rl_backend rl_backend;
struct rl_backend {
    const char *name;              /* "cpu" or "cuda:N"                       */
    const char *kernel;            /* what decides the result bits besides the
                                      weights: BLAS build and core type, or GPU
                                      arch and cuBLAS version                 */
    rl_dtype weight_dtype, act_dtype, res_dtype;
    void *impl;                    /* backend private state                   */

    /* memory */
    rl_status (*alloc)(rl_backend *be, void **ptr, size_t bytes);
    void (*free)(rl_backend *be, void *ptr);
    /* host memory for a result: malloc'd on the CPU, a pinned block of the
       process-wide pool on CUDA (rl_pinned_pool_stats) */
    rl_status (*host_alloc)(rl_backend *be, void **ptr, size_t bytes);
    /* frees (or gives back to the pool) what host_alloc returned; thread-safe and
       uses no backend state, so a result may call it after its model and backend
       are gone */
    void (*host_release)(void *ptr);
    /* host src (src_dtype, n elems) -> backend dst at element offset, in weight_dtype
       (or f32 when dst_dtype says so) */
    rl_status (*upload)(rl_backend *be, void *dst, rl_dtype dst_dtype, size_t dst_offset_elems,
                        const void *src_host, rl_dtype src_dtype, size_t n);
    rl_status (*upload_i32)(rl_backend *be, int32_t *dst, const int32_t *src_host, size_t n);
    rl_status (*download_f32)(rl_backend *be, float *dst_host, const float *src, size_t n);
    /* the same, enqueued after the work before it without waiting: dst_host (best
       from host_alloc, which CUDA pins) holds the values once `sync` returns, and
       src must not be overwritten before then (CPU: copied at once) */
    rl_status (*download_f32_async)(rl_backend *be, float *dst_host, const float *src, size_t n);
    /* waits for everything enqueued (CUDA: an event recorded on the stream) and
       reports what failed in it */
    rl_status (*sync)(rl_backend *be);
    /* free and total bytes of the device (CPU: 0,0 = unknown) */
    rl_status (*mem_info)(rl_backend *be, size_t *free_bytes, size_t *total_bytes);
    /* 1 if ptr is memory this backend allocated on its device (weights are
       checked with it after load: nothing may live elsewhere) */
    int (*is_resident)(rl_backend *be, const void *ptr);

    /* ops */
    /* x[t,:] = table[tokens[t],:] * scale  (res_dtype out; fp32 multiply; scale 1: a copy) */
    rl_status (*embed)(rl_backend *be, const int32_t *tokens, int64_t T, const void *table,
                       int64_t d, void *x, float scale);
    /* n = rmsnorm(x) * (w_offset + w), rows of d, x in x_dtype (res or act);
       accumulate=0: y = n in out_dtype (act or res); accumulate=1: y += n, y and
       out_dtype res_dtype (a post-norm fused with the residual add) */
    rl_status (*rmsnorm)(rl_backend *be, const void *x, rl_dtype x_dtype, const void *w, void *y,
                         rl_dtype out_dtype, int64_t rows, int64_t d, float eps, float w_offset,
                         int accumulate);
    /* y[M,N] = x[M,K] @ w[N,K]^T (+ bias[N]), w in the GEMM weight layout
       (gemm_pack_rows); accumulate=0: y act_dtype, overwritten;
       accumulate=1: y res_dtype, y += result (residual add fused) */
    rl_status (*gemm)(rl_backend *be, const rl_segments *seg, const void *x, const void *w,
                      const void *bias, void *y, int64_t M, int64_t N, int64_t K, int accumulate);
    /* in-place on qkv [T, (nh+2nkv)*hd] act_dtype: RMSNorm of q and k by norm_mode
       (rl_qk_norm; weights (w_offset + q_norm/k_norm), [hd] per head or [nh*hd] /
       [nkv*hd] over the whole projection; NULL for RL_QK_NORM_NONE), then rotary
       embedding of q and k with inv_freq [hd/2] f32 at each token's position (HF
       rotate_half convention) */
    rl_status (*qk_norm_rope)(rl_backend *be, const rl_segments *seg, void *qkv, int64_t T,
                              int64_t nh, int64_t nkv, int64_t hd, const void *q_norm,
                              const void *k_norm, int norm_mode, float w_offset, float eps,
                              const float *inv_freq);
    /* out[T, nh*hd] = softmax(cap(q k^T * scale)) v within each sequence, causal, GQA;
       window > 0: query i sees only keys j with i - window < j <= i (HF sliding
       window); softcap > 0: cap(s) = softcap * tanh(s / softcap), else cap(s) = s */
    rl_status (*attention)(rl_backend *be, const rl_segments *seg, const void *qkv, void *out,
                           int64_t T, int64_t nh, int64_t nkv, int64_t hd, float scale,
                           int64_t window, float softcap);
    /* out[T, ff] = act(gu[:, :ff]) * gu[:, ff:]   (gu is [T, 2ff], act an rl_act) */
    rl_status (*glu)(rl_backend *be, const void *gu, void *out, int64_t T, int64_t ff, int act);
    /* dst[i] = src[i] for i < n, converting src_dtype -> dst_dtype (f32/bf16; round to
       nearest even into bf16): the residual as a GEMM operand without a pre-norm */
    rl_status (*cast)(rl_backend *be, const void *src, rl_dtype src_dtype, void *dst,
                      rl_dtype dst_dtype, int64_t n);
    /* out[S, d] f32 (backend memory) = pooling of x (src_dtype) rows over spans; spans are
       absolute packed positions [S,2] in backend memory */
    rl_status (*pool)(rl_backend *be, const void *x, rl_dtype src_dtype, int64_t d,
                      const int32_t *spans_abs, int64_t S, rl_pool mode, float *out);

    void (*destroy)(rl_backend *be);

    /* what this backend supports (static storage; never NULL) */
    const rl_backend_caps *caps;

    /* weights kept quantized (qweights.c; q->part[] in backend memory). NULL on
       the CPU, whose memory is host memory: the engine dequantizes there itself.
       dequant_rows: rows [r0, r1) -> out [(r1-r0), cols] in out_dtype;
       dequant_gather: x[t,:] = row tokens[t] * scale, res_dtype (the embedding) */
    rl_status (*dequant_rows)(rl_backend *be, const struct rl_qtensor_s *q, int64_t r0, int64_t r1,
                              void *out, rl_dtype out_dtype);
    rl_status (*dequant_gather)(rl_backend *be, const struct rl_qtensor_s *q, const int32_t *tokens,
                                int64_t T, void *x, float scale);

    /* GEMM weights (a layer's wqkv, wo, wgu, wdown and the kept-quantized
       scratch) in the backend's own layout when gemm_pack_rows is set (the
       CPU's own GEMM: column panels packed once, gemm_builtin.h): a weight
       [N, K] then takes rl_gemm_weight_elems(gemm_row_align, N, K) elements
       (N rounded up to gemm_row_align), gemm_pack_rows writes host rows
       [r0, r0 + n) (src_dtype, row-major n x K) into it, and gemm reads w in
       it. gemm_pack_rows is thread-safe and threads itself only outside a
       parallel region. NULL: row-major [N, K] in weight_dtype, written by
       upload (CUDA, the CPU with OpenBLAS). */
    int64_t gemm_row_align;
    rl_status (*gemm_pack_rows)(rl_backend *be, void *dst, int64_t N, int64_t K, int64_t r0,
                                const void *src_host, rl_dtype src_dtype, int64_t n);
};

/* The process-wide pool of pinned host blocks that CUDA results live in
 * (kernels/cuda_backend.c): a result's block goes back to it when the result
 * is freed, up to cap_bytes of cached blocks; beyond that it is freed. */
typedef struct rl_pinned_pool_stats {
    size_t cap_bytes;       /* most bytes kept cached (RJEPA_PINNED_POOL_MB)  */
    size_t cached_bytes;    /* bytes of free blocks kept for reuse now        */
    size_t live_bytes;      /* bytes of blocks held by results now            */
    uint64_t reused;        /* allocations served from the pool               */
    uint64_t allocated;     /* allocations that called cudaHostAlloc          */
    uint64_t freed;         /* releases that called cudaFreeHost (over the cap) */
} rl_pinned_pool_stats;

/* Rows of pooled output the workspace holds per token of capacity. A forward
 * pools every (pooling, layer, span) into them and downloads them once, with
 * one wait, when its result has at most RL_POOLED_ROWS_PER_TOKEN * max_tokens
 * rows (P * nl * S: any one or two poolings x layers of a batch whose spans
 * fit max_tokens; many more for step spans, a few per sequence); a larger
 * result is pooled through them as a ring, one wait per wrap. */
#define RL_POOLED_ROWS_PER_TOKEN 2

/* The GEMM weight matrices of a layer, each named by its first kind: RL_T_Q
 * (q, k, v rows fused), RL_T_O, RL_T_GATE (gate, up rows fused), RL_T_DOWN.
 * rl_gemm_matrix_of: the matrix a kind is (part of), RL_T_COUNT for other
 * kinds; rl_gemm_matrix_rows: its rows N, and *K its columns. */
rl_tensor_kind rl_gemm_matrix_of(rl_tensor_kind kind);
int64_t rl_gemm_matrix_rows(const rl_config *cfg, rl_tensor_kind first, int64_t *K);
/* Elements of a GEMM weight [N, K] in a layout that pads N to a multiple of
 * row_align (<= 1: none); of the backend's layout (rl_backend.gemm_row_align
 * when it packs, else 1); and of one matrix of `cfg`. */
size_t rl_gemm_weight_elems(int64_t row_align, int64_t N, int64_t K);
int64_t rl_backend_gemm_row_align(const rl_backend *be);
size_t rl_gemm_matrix_elems(const rl_config *cfg, rl_tensor_kind first, int64_t row_align);

/* Bytes the weights of `cfg` take in a backend storing `weight_dtype` with
 * GEMM weights padded to gemm_row_align rows (rl_backend_gemm_row_align), and
 * the workspace of capacity max_tokens tokens with the given activation
 * dtypes. */
size_t rl_weights_bytes(const rl_config *cfg, rl_dtype weight_dtype, int64_t gemm_row_align);
size_t rl_workspace_bytes(const rl_config *cfg, rl_dtype act_dtype, rl_dtype res_dtype,
                          int64_t max_tokens);

/* ---- helpers (common.c) ------------------------------------------------- */

float rl_bf16_to_f32(uint16_t h);
uint16_t rl_f32_to_bf16(float f);   /* round to nearest even, NaN stays NaN */
float rl_f16_to_f32(uint16_t h);
/* dst[i] = (float)src[i] for i < n; src is f32, bf16 or f16. */
void rl_convert_to_f32(float *dst, const void *src, rl_dtype src_dtype, size_t n);
const char *rl_dtype_name(rl_dtype dt);

/* "embed", "q", ... (the binding's kind names); "?" if out of range. */
const char *rl_tensor_kind_name(rl_tensor_kind kind);
/* kind of a name, or -1 if unknown. */
int rl_tensor_kind_from_name(const char *name);
/* 1 for embed, final_norm, rope_inv_freq (not per layer). */
int rl_tensor_kind_is_global(rl_tensor_kind kind);

/* "mean", "first", "last", "max" (the binding's pooling names); "?" if out of range. */
const char *rl_pool_name(int pool);
/* pooling of a name, or -1 if unknown. */
int rl_pool_from_name(const char *name);

/* RL_OK or RL_ERR_INVALID naming the bad field. */
rl_status rl_config_validate(const rl_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* RL_COMMON_H */
