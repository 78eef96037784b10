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

typedef enum {
    RL_QF_NONE = 0,
    RL_QF_GGUF = 1,       /* subtype: the GGML type id; part[0]: the blocks, rows after rows */
    RL_QF_AWQ = 2,        /* subtype: bits; part[0..2]: qweight, qzeros, scales (GEMM packing) */
    RL_QF_GPTQ = 3,       /* subtype: bits; part[0..3]: qweight, qzeros, scales, g_idx (may be NULL) */
    RL_QF_FP8_BLOCK = 4,  /* e4m3; part[0..1]: weight, weight_scale_inv; group = block edge */
} rl_qfamily;

#define RL_QUANT_MAX_PARTS 4

typedef struct {
    int family;           /* rl_qfamily */
    int subtype;          /* see rl_qfamily */
    int64_t rows, cols;   /* the logical [rows, cols] weight */
    int64_t group;        /* group size (AWQ, GPTQ), block edge (FP8); 0 where unused */
    int sym;              /* GPTQ: 1 when symmetric (no zero points stored) */
    const void *part[RL_QUANT_MAX_PARTS];
    size_t part_bytes[RL_QUANT_MAX_PARTS];
} rl_qtensor;

#endif /* RL_QUANT_H */
