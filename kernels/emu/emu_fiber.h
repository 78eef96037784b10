// emu_fiber.h - user-space context switch for the emulated device's threads.
// x86-64: six callee-saved registers, MXCSR and the x87 control word, then
// the stack pointer (a few nanoseconds a switch); elsewhere ucontext. Each
// emulated CUDA thread is a fiber; a block's fibers all run on one worker
// thread, switching only at barriers and warp collectives.
#ifndef RL_EMU_FIBER_H
#define RL_EMU_FIBER_H

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace rl_emu {

struct FiberContext {
#if defined(__x86_64__)
    void *sp = nullptr;
#else
    ucontext_t uc;
#endif
};

// Prepares `ctx` to start `entry()` on [stack, stack + size) at the next switch to it.
void fiber_prepare(FiberContext *ctx, void *stack, size_t size, void (*entry)());
// Saves the running context into `from`, resumes `to`.
void fiber_switch(FiberContext *from, FiberContext *to);

} // namespace rl_emu
#endif
