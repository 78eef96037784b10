/* common.h - helpers shared by engine.c, the backends and binding.c.
 *
 * Not part of the engine.h contract (which a backend needs to implement);
 * these are conveniences built on it: dtype conversions (exact for
 * bf16/f16 -> f32, round-to-nearest-even for f32 -> bf16), tensor kind
 * names (the same strings the binding accepts), config validation (used by
 * rl_model_create and by the binding's plan_bytes) and what the CPU backend
 * tells the binding.
 */
#ifndef RL_COMMON_H
#define RL_COMMON_H

#include "engine.h"

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

/* The CPU backend (ops_cpu.c): its capabilities (static storage), and the
 * GEMM it was built with ("scipy-openblas32 <config>" or "builtin C GEMM"). */
const rl_backend_caps *rl_cpu_caps(void);
void rl_cpu_blas_name(char *buf, size_t cap);

#endif /* RL_COMMON_H */
