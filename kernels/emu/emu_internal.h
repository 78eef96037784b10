// emu_internal.h - what the emulated runtime offers the other parts of the
// emulation layer (the cuBLAS stand-in): work on a stream, address checks,
// diagnostics and counters.
#ifndef RL_EMU_INTERNAL_H
#define RL_EMU_INTERNAL_H

#include <cstddef>
#include <functional>

#include "cuda_runtime_api.h"

namespace rl_emu {
// Enqueues `fn` on `s` (0: the default stream); false for an unknown stream.
bool stream_push(cudaStream_t s, std::function<void()> fn);
// [p, p + n) lies inside one cudaMalloc allocation
bool device_range(const void *p, size_t n);
void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void count_gemm();
// the device has faulted (work is dropped, every call fails)
bool faulted();
} // namespace rl_emu

#endif
