/* quant_hf.h - dequantization of the HF directory formats (AWQ, GPTQ, FP8
 * block scales) on the CPU, into fp32 rows of the logical weight.
 *
 * Parts of an rl_qtensor (rows = out_features, cols = in_features), exactly
 * as the safetensors files store them:
 *   RL_QF_AWQ (GEMM packing, 4 bits)
 *     part[0] qweight int32 [cols, rows/8]; 8 output features per word, the
 *             feature 8w+j at bit 4*{0,4,1,5,2,6,3,7}[j]
 *     part[1] qzeros  int32 [cols/group, rows/8], same packing, or NULL
 *             (no zero points: zero = 8)
 *     part[2] scales  [cols/group, rows]
 *   RL_QF_GPTQ (2, 4 or 8 bits; pf = 32/bits values per word, lowest first)
 *     part[0] qweight int32 [cols/pf, rows]; packed along the input features
 *     part[1] qzeros  int32 [groups, rows/pf], packed along the output
 *             features, or NULL (symmetric: zero = 2^(bits-1))
 *     part[2] scales  [groups, rows]
 *     part[3] g_idx   int32 [cols] (the group of each input feature) or NULL
 *             (group of feature i = i / group)
 *   RL_QF_FP8_BLOCK (e4m3fn)
 *     part[0] weight  uint8 [rows, cols]
 *     part[1] weight_scale_inv [ceil(rows/group), ceil(cols/group)]
 * A weight is (q - zero) * scale (AWQ, GPTQ) or e4m3(q) * scale (FP8),
 * computed in fp32 with the scale converted exactly to fp32.
 *
 * `subtype` = bits | scale dtype << 8 | flags (RL_QHF_SUBTYPE); FP8 has
 * bits 8. */
#ifndef RL_QUANT_HF_H
#define RL_QUANT_HF_H

#include <stddef.h>
#include <stdint.h>

#include "quant.h"

enum { RL_QHF_SCALE_F16 = 0, RL_QHF_SCALE_BF16 = 1, RL_QHF_SCALE_F32 = 2 };
/* GPTQ checkpoint_format "gptq" (v1): each stored zero point is the zero
 * minus one. */
#define RL_QHF_ZERO_MINUS_ONE (1 << 16)
#define RL_QHF_SUBTYPE(bits, scale_dtype, flags) ((bits) | ((scale_dtype) << 8) | (flags))
#define RL_QHF_BITS(subtype) ((subtype) & 0xFF)
#define RL_QHF_SCALE_DTYPE(subtype) (((subtype) >> 8) & 0xFF)

/* Rows [r0, r1) of q's logical weight into out ((r1 - r0) * cols floats,
 * row-major), on an OpenMP team of n_threads (the model's count, never the
 * process-wide default; 1 inside another parallel region); the bits do not
 * depend on it. *team (when not NULL) gets the team that ran. Every part
 * size and index is checked first (the parts are never read out of bounds);
 * returns 0, or -1 with a message in err. */
int rl_dequant_hf_rows_f32(const rl_qtensor *q, int64_t r0, int64_t r1, float *out,
                           int n_threads, int *team, char *err, size_t errlen);
/* The whole tensor checked as the dequantization would check it (part
 * sizes, every scale finite, g_idx in range, no FP8 NaN code), without
 * dequantizing: for weights kept quantized. 0, or -1 with a message. */
int rl_qtensor_validate_hf(const rl_qtensor *q, char *err, size_t errlen);

#endif /* RL_QUANT_HF_H */
