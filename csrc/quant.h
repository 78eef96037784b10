/* quant.h - weights kept in their stored quantized format: one descriptor per
 * logical weight matrix and the dequantization entry points (CPU, fp32).
 *
 * A logical weight is the row-major [rows, cols] matrix the engine's GEMMs
 * read (rows = output features, cols = input features), whatever layout the
 * file stores it in. Each format's parts stay as they are in the file. */
#ifndef RL_QUANT_H
#define RL_QUANT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    RL_QF_NONE = 0,
    RL_QF_GGUF = 1,       /* subtype: the GGML type id; part[0]: the blocks, rows after rows */
    RL_QF_AWQ = 2,        /* subtype: bits; part[0..2]: qweight, qzeros, scales (GEMM packing) */
    RL_QF_GPTQ = 3,       /* subtype: bits; part[0..3]: qweight, qzeros, scales, g_idx (may be NULL) */
    RL_QF_FP8_BLOCK = 4,  /* e4m3; part[0..1]: weight, weight_scale_inv; group = block edge */
} rl_qfamily;

#define RL_QUANT_MAX_PARTS 4

typedef struct rl_qtensor_s {
    int family;           /* rl_qfamily */
    int subtype;          /* see rl_qfamily */
    int64_t rows, cols;   /* the logical [rows, cols] weight */
    int64_t group;        /* group size (AWQ, GPTQ), block edge (FP8); 0 where unused */
    int sym;              /* GPTQ: 1 when symmetric (no zero points stored) */
    const void *part[RL_QUANT_MAX_PARTS];
    size_t part_bytes[RL_QUANT_MAX_PARTS];
} rl_qtensor;


/* GGML type ids as GGUF files store them (the GGUF family's subtype). */
enum {
    RL_GGML_F32 = 0, RL_GGML_F16 = 1, RL_GGML_Q4_0 = 2, RL_GGML_Q4_1 = 3,
    RL_GGML_Q5_0 = 6, RL_GGML_Q5_1 = 7, RL_GGML_Q8_0 = 8,
    RL_GGML_Q2_K = 10, RL_GGML_Q3_K = 11, RL_GGML_Q4_K = 12, RL_GGML_Q5_K = 13,
    RL_GGML_Q6_K = 14, RL_GGML_IQ4_NL = 20, RL_GGML_IQ4_XS = 23, RL_GGML_BF16 = 30,
};

/* Elements per block and bytes per block of a GGML type; 0 when this build
 * does not dequantize it. */
int rl_gguf_type_info(int ggml_type, int64_t *block_elems, int64_t *block_bytes);
/* Name of a GGML type ("Q4_K"), "?" when unknown. */
const char *rl_gguf_type_name(int ggml_type);

/* Bytes of part[0] one logical row takes (GGUF; 0 for other families or an
 * unsupported type). */
size_t rl_qtensor_row_bytes(const rl_qtensor *q);

/* Checks that a descriptor is consistent (family and type known, row length
 * a multiple of the block, part sizes matching rows x cols) and, for GGUF,
 * that every scale the format stores as a float is finite. 0 on success;
 * otherwise nonzero with a message in err naming the row and block. */
int rl_qtensor_validate(const rl_qtensor *q, char *err, size_t errlen);

/* Dequantizes logical rows [r0, r1) into out (row-major fp32, (r1 - r0) x
 * cols), bitwise as gguf-py's gguf.quants.dequantize for GGUF types. The
 * caller validated q (rl_qtensor_validate); rows out of range or a family
 * not handled here fail with a message. 0 on success. */
int rl_dequant_rows_f32(const rl_qtensor *q, int64_t r0, int64_t r1, float *out, char *err,
                        size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* RL_QUANT_H */
