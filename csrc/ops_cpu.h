/* ops_cpu.h - the CPU backend (ops_cpu.c): its constructor, capabilities and
 * the GEMM it was built with. */
#ifndef RL_OPS_CPU_H
#define RL_OPS_CPU_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A CPU backend running n_threads threads (0: all cores). On failure *out
 * is NULL and the message says why. */
rl_status rl_backend_cpu_create(int n_threads, rl_backend **out);
/* Upper bound on n_threads (far above any core count this runs on). */
#define RL_CPU_MAX_THREADS 1024
/* The threads of a CPU backend's OpenMP teams (what it was created with);
 * 1 for any other backend. Host-side work for a model (dequantization)
 * runs on this many, not on the process-wide OpenMP default. */
int rl_backend_cpu_threads(const rl_backend *be);

/* Its capabilities (static storage), and the
 * GEMM it was built with ("scipy-openblas32 <config>" or "builtin C GEMM"). */
const rl_backend_caps *rl_cpu_caps(void);
void rl_cpu_blas_name(char *buf, size_t cap);
/* The row alignment of the GEMM weight layout (rl_backend.gemm_row_align) a
 * CPU backend created now would have: the own GEMM's panel width for the ISA
 * RJEPA_CPU_ISA picks (its weights are packed at load), 1 with
 * RJEPA_GEMM=openblas (row-major weights). For memory plans. */
int64_t rl_cpu_gemm_row_align(void);

#ifdef __cplusplus
}
#endif
#endif /* RL_OPS_CPU_H */
