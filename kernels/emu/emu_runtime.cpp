// emu_runtime.cpp - the emulated CUDA device (RJEPA_CUDA=emu builds only):
// the runtime calls kernels/cuda_backend.c makes, and the execution of
// kernels compiled from kernels/*.cu by the host compiler.
//
// - Memory: device memory is host memory, filled with 0xFF bytes (NaN in
//   f32 and bf16) when allocated, so outputs a kernel never writes show.
//   Device capacity is RJEPA_EMU_DEVICE_MEMORY (e.g. 2GiB; default 8GiB):
//   cudaMalloc past it fails, cudaMemGetInfo reports it.
// - Streams: each has a worker thread that runs its work in order, so work
//   is really asynchronous: a host read before a sync sees stale data.
//   Copies to or from pageable host memory block as the real driver's do;
//   pinned (cudaHostAlloc) memory is read / written when the copy runs.
// - Kernels: a grid's blocks are spread over a pool of worker threads
//   (RJEPA_EMU_WORKERS, default the CPU count). A block's CUDA threads are
//   fibers on one worker; they switch only at __syncthreads and at warp
//   collectives, whose barriers are exact: a barrier the block's live
//   threads do not all reach, threads at different barriers, or a warp
//   collective some lanes skip is an error (a sticky launch failure and a
//   diagnostic on stderr), never a hang. RJEPA_EMU_ORDER = forward
//   (default), reverse or shuffle[:seed] sets the order threads run in
//   between barriers, so a missing barrier changes results.
// - Errors are sticky like a real device fault: after one, every call
//   returns it and queued work is dropped. RJEPA_EMU_FAULT_KERNEL=<text>
//   makes the first launch of a kernel whose name holds <text> fault (an
//   illegal address), for tests of how faults are reported.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"
#include "emu_fiber.h"
#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define RL_EMU_ASAN 1
#endif

// ---------------------------------------------------------------------------
// fibers
// ---------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void rl_emu_switch_sp(void **save_sp, void *new_sp);
asm(R"(
    .text
    .globl rl_emu_switch_sp
    .hidden rl_emu_switch_sp
    .type rl_emu_switch_sp, @function
rl_emu_switch_sp:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rl_emu_switch_sp, .-rl_emu_switch_sp
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace rl_emu {

#if defined(__x86_64__)
void fiber_prepare(FiberContext *ctx, void *stack, size_t size, void (*entry)())
{
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)top;
    *--sp = 0;                   // entry's (never used) return address: rsp % 16 == 8 at entry
    *--sp = (uint64_t)entry;     // ret target
    for (int i = 0; i < 6; i++) *--sp = 0; // rbp rbx r12-r15
    uint32_t mxcsr = 0;
    uint16_t fpucw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = (uint64_t)mxcsr | ((uint64_t)fpucw << 32); // the layout rl_emu_switch_sp restores
    ctx->sp = sp;
}
void fiber_switch(FiberContext *from, FiberContext *to) { rl_emu_switch_sp(&from->sp, to->sp); }
#else
void fiber_prepare(FiberContext *ctx, void *stack, size_t size, void (*entry)())
{
    getcontext(&ctx->uc);
    ctx->uc.uc_stack.ss_sp = stack;
    ctx->uc.uc_stack.ss_size = size;
    ctx->uc.uc_link = nullptr;
    makecontext(&ctx->uc, entry, 0);
}
void fiber_switch(FiberContext *from, FiberContext *to) { swapcontext(&from->uc, &to->uc); }
#endif

__thread ThreadCtx *tls_cur;

namespace {

// ---------------------------------------------------------------------------
// diagnostics, sticky error, counters
// ---------------------------------------------------------------------------
std::mutex g_diag_mu;
std::string g_diag;
std::atomic<int> g_sticky{cudaSuccess};
__thread int tls_last_error = cudaSuccess;

struct Counters {
    std::atomic<long long> stream_syncs{0}, event_syncs{0}, device_syncs{0}, blocking_copies{0},
        launches{0}, blocks{0}, gemms{0}, h2d{0}, d2h{0};
} g_count;

void diagnose(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void diagnose(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    {
        std::lock_guard<std::mutex> lk(g_diag_mu);
        g_diag = buf;
    }
    fprintf(stderr, "rjepa emulated device: %s\n", buf);
}

void set_sticky(cudaError_t e)
{
    int expected = cudaSuccess;
    g_sticky.compare_exchange_strong(expected, e);
}

cudaError_t fail(cudaError_t e)
{
    tls_last_error = e;
    return e;
}

// RJEPA_EMU_DEVICE_MEMORY: bytes, or a number with K/M/G/T(i)(B)
size_t device_capacity()
{
    static size_t cap = [] {
        size_t def = (size_t)8 << 30;
        const char *s = getenv("RJEPA_EMU_DEVICE_MEMORY");
        if (!s || !*s) return def;
        char *end = nullptr;
        double v = strtod(s, &end);
        if (end == s || v <= 0) {
            fprintf(stderr, "rjepa emulated device: RJEPA_EMU_DEVICE_MEMORY=%s is not a size "
                            "(e.g. 2GiB); using 8GiB\n", s);
            return def;
        }
        double mul = 1;
        switch (*end) {
        case 'k': case 'K': mul = 1024.0; break;
        case 'm': case 'M': mul = 1024.0 * 1024; break;
        case 'g': case 'G': mul = 1024.0 * 1024 * 1024; break;
        case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; break;
        default: break;
        }
        return (size_t)(v * mul);
    }();
    return cap;
}

// ---------------------------------------------------------------------------
// memory registry
// ---------------------------------------------------------------------------
std::mutex g_mem_mu;
std::map<uintptr_t, size_t> g_device;  // base -> bytes
std::map<uintptr_t, size_t> g_pinned;  // base -> bytes
size_t g_device_used = 0, g_device_peak = 0;

// the allocation of `map` holding [p, p + n), or false
bool in_range(const std::map<uintptr_t, size_t> &map, const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;
    auto it = map.upper_bound(a);
    if (it == map.begin()) return false;
    --it;
    return a >= it->first && a + n <= it->first + std::max<size_t>(it->second, 1);
}

bool is_device(const void *p, size_t n)
{
    std::lock_guard<std::mutex> lk(g_mem_mu);
    return in_range(g_device, p, n);
}
bool is_pinned(const void *p, size_t n)
{
    std::lock_guard<std::mutex> lk(g_mem_mu);
    return in_range(g_pinned, p, n);
}

// ---------------------------------------------------------------------------
// block execution: fibers, barriers, warp collectives
// ---------------------------------------------------------------------------
enum FiberState { F_READY, F_BARRIER, F_WARP, F_DONE };
constexpr int kSlotWords = 16; // words a lane contributes to one collective

struct EmuFiber {
    FiberContext ctx;
    ThreadCtx tc;
    int state = F_DONE;
    int lane = 0, warp = 0;
    int wait_line = 0;
    char *stack = nullptr;
    size_t stack_size = 0;
#ifdef RL_EMU_ASAN
    void *fake_stack = nullptr;
#endif
};

struct WarpState {
    int n_lanes = 0, arrived = 0, exited = 0, kind = 0, line = 0;
    uint32_t gen = 0;
    uint64_t slots[2][32 * kSlotWords];
};

enum Order { ORDER_FORWARD, ORDER_REVERSE, ORDER_SHUFFLE };

struct Scheduling {
    Order order = ORDER_FORWARD;
    uint64_t seed = 0;
};
Scheduling &scheduling()
{
    static Scheduling s = [] {
        Scheduling r;
        const char *o = getenv("RJEPA_EMU_ORDER");
        if (!o || !*o || !strcmp(o, "forward")) return r;
        if (!strcmp(o, "reverse")) {
            r.order = ORDER_REVERSE;
        } else if (!strncmp(o, "shuffle", 7)) {
            r.order = ORDER_SHUFFLE;
            r.seed = o[7] == ':' ? strtoull(o + 8, nullptr, 10) : 1;
        } else {
            fprintf(stderr, "rjepa emulated device: RJEPA_EMU_ORDER=%s is not forward, reverse "
                            "or shuffle[:seed]; using forward\n", o);
        }
        return r;
    }();
    return s;
}

size_t fiber_stack_bytes()
{
#ifdef RL_EMU_ASAN
    return 512 * 1024;
#else
    return 128 * 1024;
#endif
}

struct BlockRunner {
    std::vector<EmuFiber> fibers;
    std::vector<WarpState> warps;
    std::vector<int> order;
    FiberContext sched;
    const std::function<void()> *body = nullptr;
    const char *kernel = "";
    uint3 block_idx{0, 0, 0};
    int n = 0, live = 0, at_barrier = 0, barrier_line = 0;
    bool error = false;
    std::mt19937_64 rng;
#ifdef RL_EMU_ASAN
    void *sched_fake = nullptr;
    const void *sched_bottom = nullptr;
    size_t sched_size = 0;
#endif

    ~BlockRunner()
    {
        for (auto &f : fibers)
            if (f.stack) munmap(f.stack, f.stack_size);
    }

    void ensure(int nthreads)
    {
        if ((int)fibers.size() >= nthreads) return;
        const size_t bytes = fiber_stack_bytes(), page = (size_t)sysconf(_SC_PAGESIZE);
        size_t old = fibers.size();
        fibers.resize(nthreads);
        for (size_t i = old; i < fibers.size(); i++) {
            void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
            if (p == MAP_FAILED) {
                fprintf(stderr, "rjepa emulated device: out of memory for thread stacks\n");
                abort();
            }
            mprotect(p, page, PROT_NONE); // a stack overflow faults instead of corrupting
            fibers[i].stack = (char *)p;
            fibers[i].stack_size = bytes;
        }
    }

    [[noreturn]] void fail_in_fiber(EmuFiber *f, const char *what, int a = 0, int b = 0);
    void resume(EmuFiber *f);
    void yield(EmuFiber *f);
    bool run(const std::function<void()> *fn, const char *name, dim3 grid, dim3 block, uint3 bidx);
    void release_barrier()
    {
        for (int i = 0; i < n; i++)
            if (fibers[i].state == F_BARRIER) fibers[i].state = F_READY;
        at_barrier = 0;
    }
    std::string where() const
    {
        char buf[256];
        snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", kernel, block_idx.x, block_idx.y,
                 block_idx.z);
        return buf;
    }
};

thread_local BlockRunner *tls_runner;
__thread EmuFiber *tls_fiber;

void fiber_entry()
{
    BlockRunner *r = tls_runner;
#ifdef RL_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &r->sched_bottom, &r->sched_size);
#endif
    (*r->body)();
    EmuFiber *f = tls_fiber;
    f->state = F_DONE;
    r->live--;
    WarpState &w = r->warps[f->warp];
    w.exited++;
    if (w.arrived > 0) {
        r->error = true;
        diagnose("%s: thread %d left the kernel while lanes of its warp wait in a warp "
                 "collective (line %d)", r->where().c_str(), (int)(f - r->fibers.data()), w.line);
    }
    if (r->at_barrier > 0 && r->at_barrier == r->live) r->release_barrier();
#ifdef RL_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, r->sched_bottom, r->sched_size);
#endif
    fiber_switch(&f->ctx, &r->sched);
    abort(); // never resumed
}

void BlockRunner::resume(EmuFiber *f)
{
    tls_fiber = f;
    tls_cur = &f->tc;
#ifdef RL_EMU_ASAN
    __sanitizer_start_switch_fiber(&sched_fake, f->stack, f->stack_size);
#endif
    fiber_switch(&sched, &f->ctx);
#ifdef RL_EMU_ASAN
    __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
}

void BlockRunner::yield(EmuFiber *f)
{
#ifdef RL_EMU_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, sched_bottom, sched_size);
#endif
    fiber_switch(&f->ctx, &sched);
#ifdef RL_EMU_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

void BlockRunner::fail_in_fiber(EmuFiber *f, const char *what, int a, int b)
{
    error = true;
    char msg[512];
    snprintf(msg, sizeof msg, what, a, b);
    diagnose("%s, thread %d: %s", where().c_str(), (int)(f - fibers.data()), msg);
    for (;;) yield(f); // never resumed: the block is abandoned
}

bool BlockRunner::run(const std::function<void()> *fn, const char *name, dim3 grid, dim3 block,
                      uint3 bidx)
{
    body = fn;
    kernel = name;
    block_idx = bidx;
    n = (int)(block.x * block.y * block.z);
    ensure(n);
    live = n;
    at_barrier = 0;
    error = false;
    const int nwarps = (n + 31) / 32;
    if ((int)warps.size() < nwarps) warps.resize(nwarps);
    for (int w = 0; w < nwarps; w++) {
        WarpState &ws = warps[w];
        ws.n_lanes = std::min(32, n - 32 * w);
        ws.arrived = ws.exited = ws.kind = ws.line = 0;
        ws.gen = 0;
    }
    for (int i = 0; i < n; i++) {
        EmuFiber &f = fibers[i];
#ifdef RL_EMU_ASAN
        // a reused stack keeps the redzones of frames abandoned there; the
        // frames instrumented code builds set their own, the first one is ours
        __asan_unpoison_memory_region(f.stack + f.stack_size - 8192, 8192);
#endif
        f.tc.thread_idx = uint3{(unsigned)i % block.x, (unsigned)i / block.x % block.y,
                                (unsigned)i / (block.x * block.y)};
        f.tc.block_idx = bidx;
        f.tc.block_dim = block;
        f.tc.grid_dim = grid;
        f.lane = i & 31;
        f.warp = i >> 5;
        f.state = F_READY;
        fiber_prepare(&f.ctx, f.stack, f.stack_size, fiber_entry);
    }
    const Scheduling sch = scheduling();
    order.resize(n);
    for (int i = 0; i < n; i++) order[i] = sch.order == ORDER_REVERSE ? n - 1 - i : i;
    if (sch.order == ORDER_SHUFFLE)
        rng.seed(sch.seed * 0x9e3779b97f4a7c15ull + bidx.x * 1000003ull + bidx.y * 7919ull + bidx.z);
    tls_runner = this;
    ThreadCtx *saved_cur = tls_cur;
    while (live > 0 && !error) {
        if (sch.order == ORDER_SHUFFLE) std::shuffle(order.begin(), order.end(), rng);
        int ran = 0;
        for (int k = 0; k < n && !error; k++) {
            EmuFiber *f = &fibers[order[k]];
            if (f->state != F_READY) continue;
            resume(f);
            ran++;
        }
        if (!error && ran == 0 && live > 0) {
            int at_bar = 0, at_warp = 0, bar_line = 0, warp_line = 0;
            for (int i = 0; i < n; i++) {
                if (fibers[i].state == F_BARRIER) at_bar++, bar_line = barrier_line;
                if (fibers[i].state == F_WARP) at_warp++, warp_line = warps[fibers[i].warp].line;
            }
            error = true;
            diagnose("%s: barrier deadlock: %d thread(s) wait at __syncthreads (line %d), %d in "
                     "a warp collective (line %d), %d exited; a barrier not every live thread "
                     "reaches", where().c_str(), at_bar, bar_line, at_warp, warp_line, n - live);
        }
    }
    tls_cur = saved_cur;
    return !error;
}

// ---------------------------------------------------------------------------
// the worker pool that runs grids
// ---------------------------------------------------------------------------
struct GridJob {
    const std::function<void()> *body;
    const char *name;
    dim3 grid, block;
    long total;
    std::atomic<long> next{0};
    long done = 0;                   // under the pool's mutex
    std::atomic<bool> failed{false};
};

class Pool {
public:
    static Pool &get()
    {
        static Pool *p = new Pool(); // never destroyed: workers may outlive static destructors
        return *p;
    }
    // Runs every block of the grid; false when one failed.
    bool run(GridJob &job)
    {
        std::unique_lock<std::mutex> lk(mu_);
        jobs_.push_back(&job);
        cv_.notify_all();
        done_cv_.wait(lk, [&] { return job.done == job.total; });
        return !job.failed;
    }
    int workers() const { return n_; }

private:
    Pool()
    {
        int n = (int)std::thread::hardware_concurrency();
        const char *s = getenv("RJEPA_EMU_WORKERS");
        if (s && atoi(s) > 0) n = atoi(s);
        n_ = std::max(1, std::min(n, 64));
        for (int i = 0; i < n_; i++) std::thread([this] { loop(); }).detach();
    }
    void loop()
    {
        BlockRunner runner;
        std::unique_lock<std::mutex> lk(mu_);
        for (;;) {
            cv_.wait(lk, [&] { return !jobs_.empty(); });
            GridJob *job = jobs_.front();
            long b = job->next.fetch_add(1);
            if (b >= job->total) {
                if (!jobs_.empty() && jobs_.front() == job) jobs_.pop_front();
                continue;
            }
            if (b == job->total - 1) jobs_.pop_front(); // the last block is taken
            lk.unlock();
            const bool skip = job->failed; // read racily: only saves work after a failure
            bool ok = true;
            if (!skip) {
                const long gx = job->grid.x, gy = job->grid.y;
                uint3 bidx{(unsigned)(b % gx), (unsigned)(b / gx % gy), (unsigned)(b / (gx * gy))};
                ok = runner.run(job->body, job->name, job->grid, job->block, bidx);
                g_count.blocks++;
            }
            lk.lock();
            if (!ok) job->failed = true;
            if (++job->done == job->total) done_cv_.notify_all();
        }
    }
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    std::deque<GridJob *> jobs_;
    int n_ = 1;
};

} // namespace

void set_order(int order, uint64_t seed)
{
    scheduling().order = order == 1 ? ORDER_REVERSE : order == 2 ? ORDER_SHUFFLE : ORDER_FORWARD;
    scheduling().seed = seed;
}

// ---------------------------------------------------------------------------
// device-side entry points (called from kernel code)
// ---------------------------------------------------------------------------
void syncthreads(int line)
{
    BlockRunner *r = tls_runner;
    EmuFiber *f = tls_fiber;
    if (r->at_barrier == 0)
        r->barrier_line = line;
    else if (r->barrier_line != line)
        r->fail_in_fiber(f, "threads wait at different __syncthreads (line %d and line %d)",
                         r->barrier_line, line);
    f->state = F_BARRIER;
    if (++r->at_barrier == r->live) r->release_barrier();
    r->yield(f);
}

int lane_id() { return tls_fiber->lane; }

const uint64_t *warp_exchange(unsigned mask, int kind, int line, const uint64_t *words, int n)
{
    BlockRunner *r = tls_runner;
    EmuFiber *f = tls_fiber;
    WarpState &w = r->warps[f->warp];
    if (mask != 0xffffffffu || w.n_lanes != 32)
        r->fail_in_fiber(f, "warp collective at line %d with a partial mask or warp (%d lanes): "
                            "not emulated", line, w.n_lanes);
    if (w.exited)
        r->fail_in_fiber(f, "warp collective at line %d while %d lane(s) of the warp have exited",
                         line, w.exited);
    if (w.arrived == 0) {
        w.kind = kind;
        w.line = line;
    } else if (w.kind != kind || w.line != line) {
        r->fail_in_fiber(f, "lanes of one warp are in different warp collectives (line %d and "
                            "line %d)", w.line, line);
    }
    const uint32_t gen = w.gen;
    uint64_t *slot = &w.slots[gen & 1][f->lane * kSlotWords];
    for (int i = 0; i < n; i++) slot[i] = words[i];
    if (++w.arrived == w.n_lanes) {
        EmuFiber *first = &r->fibers[f->warp * 32];
        for (int l = 0; l < 32; l++)
            if (first[l].state == F_WARP) first[l].state = F_READY;
        w.arrived = 0;
        w.gen++;
    } else {
        f->state = F_WARP;
        r->yield(f);
    }
    return w.slots[gen & 1];
}

// The PTX ISA fragment layouts of mma.m16n8k16 with .bf16 A/B and .f32 C/D
// (groupID g = lane / 4, thread-in-group t = lane % 4; two bf16 per 32-bit
// register, the lower-indexed element in the low half):
//   A (16x16, row): a_i holds rows g (i = 0, 2) / g + 8 (i = 1, 3), columns
//                   2t, 2t + 1, plus 8 for i >= 2
//   B (16x8, col):  b_i holds rows (k) 2t, 2t + 1, plus 8 for i = 1, column g
//   C / D (16x8):   c0, c1 row g, c2, c3 row g + 8; columns 2t, 2t + 1
namespace {
inline float bf16_at(uint64_t reg, int half)
{
    return bits_to_f32((uint32_t)((reg >> (16 * half)) & 0xffffu) << 16);
}
inline float mma_a(const uint64_t *all, int row, int k)
{
    const int lane = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
    return bf16_at(all[lane * kSlotWords + reg], k & 1);
}
inline float mma_b(const uint64_t *all, int k, int col)
{
    const int lane = col * 4 + (k % 8) / 2, reg = k >= 8;
    return bf16_at(all[lane * kSlotWords + 4 + reg], k & 1);
}
} // namespace

void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, int line)
{
    const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const uint64_t *all = warp_exchange(0xffffffffu, COLL_MMA, line, mine, 6);
    const int lane = lane_id(), g = lane >> 2, t = lane & 3;
    // this lane's D elements: rows g, g + 8 of A times columns 2t, 2t + 1 of B
    float a_rows[2][16], b_cols[2][16];
    for (int k = 0; k < 16; k++) {
        a_rows[0][k] = mma_a(all, g, k);
        a_rows[1][k] = mma_a(all, g + 8, k);
        b_cols[0][k] = mma_b(all, k, 2 * t);
        b_cols[1][k] = mma_b(all, k, 2 * t + 1);
    }
    for (int i = 0; i < 4; i++) {
        const float *ar = a_rows[i >> 1], *bc = b_cols[i & 1];
        double acc = 0.0; // bf16 x bf16 products are exact in double, their sum nearly so
        for (int k = 0; k < 16; k++) acc += (double)ar[k] * bc[k];
        c[i] = (float)(acc + (double)c[i]);
    }
}

// ldmatrix .x2 .trans: lanes 0-7 give the row addresses of matrix 0, lanes
// 8-15 of matrix 1 (16-byte aligned rows of 8 b16); with .trans lane l gets,
// of matrix i, rows 2(l % 4) (low half) and 2(l % 4) + 1 (high) of column l / 4.
void ldmatrix_x2_trans(uint32_t &r0, uint32_t &r1, const void *row_addr, int line)
{
    const uint64_t mine = (uint64_t)(uintptr_t)row_addr;
    const uint64_t *all = warp_exchange(0xffffffffu, COLL_LDMATRIX, line, &mine, 1);
    const int lane = lane_id();
    if (lane < 16 && (mine & 15) != 0)
        tls_runner->fail_in_fiber(tls_fiber, "ldmatrix row address of lane %d is not 16-byte "
                                             "aligned (line %d)", lane, line);
    uint32_t out[2];
    for (int m = 0; m < 2; m++) {
        const int col = lane / 4, row = 2 * (lane % 4);
        uint16_t lo, hi;
        std::memcpy(&lo, (const char *)(uintptr_t)all[(8 * m + row) * kSlotWords] + 2 * col, 2);
        std::memcpy(&hi, (const char *)(uintptr_t)all[(8 * m + row + 1) * kSlotWords] + 2 * col, 2);
        out[m] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    r0 = out[0];
    r1 = out[1];
}

} // namespace rl_emu

// ---------------------------------------------------------------------------
// streams and events
// ---------------------------------------------------------------------------
using rl_emu::g_count;

struct CUstream_st {
    std::mutex mu;
    std::condition_variable cv, idle_cv;
    std::deque<std::function<void()>> q;
    bool busy = false, stop = false;
    std::thread th;

    CUstream_st()
    {
        th = std::thread([this] { loop(); });
    }
    void loop()
    {
        std::unique_lock<std::mutex> lk(mu);
        for (;;) {
            cv.wait(lk, [&] { return stop || !q.empty(); });
            if (q.empty()) return; // stop
            std::function<void()> fn = std::move(q.front());
            q.pop_front();
            busy = true;
            lk.unlock();
            fn();
            lk.lock();
            busy = false;
            if (q.empty()) idle_cv.notify_all();
        }
    }
    void push(std::function<void()> fn)
    {
        std::lock_guard<std::mutex> lk(mu);
        q.push_back(std::move(fn));
        cv.notify_one();
    }
    void drain()
    {
        std::unique_lock<std::mutex> lk(mu);
        idle_cv.wait(lk, [&] { return q.empty() && !busy; });
    }
    bool idle()
    {
        std::lock_guard<std::mutex> lk(mu);
        return q.empty() && !busy;
    }
    ~CUstream_st()
    {
        {
            std::lock_guard<std::mutex> lk(mu);
            stop = true;
            cv.notify_one();
        }
        th.join();
    }
};

struct CUevent_st {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t recorded = 0, completed = 0;
};

namespace {

std::mutex g_streams_mu;
std::map<cudaStream_t, CUstream_st *> g_streams; // live created streams
std::map<cudaEvent_t, CUevent_st *> g_events;

CUstream_st *default_stream()
{
    static CUstream_st *s = new CUstream_st(); // never destroyed (process-lifetime)
    return s;
}

// the stream object for a handle, or nullptr for an unknown handle
CUstream_st *stream_of(cudaStream_t s)
{
    if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return default_stream();
    std::lock_guard<std::mutex> lk(g_streams_mu);
    return g_streams.count(s) ? s : nullptr;
}

bool event_known(cudaEvent_t e)
{
    std::lock_guard<std::mutex> lk(g_streams_mu);
    return g_events.count(e) != 0;
}

cudaError_t sticky() { return (cudaError_t)rl_emu::g_sticky.load(); }

} // namespace

cudaError_t rl_emu::launch(const char *name, dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                           std::function<void()> body)
{
    if (cudaError_t e = sticky()) return fail(e);
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
        grid.z > 65535 || threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 ||
        block.z > 64 || smem > 48 * 1024)
        return fail(cudaErrorInvalidConfiguration);
    CUstream_st *st = stream_of(s);
    if (!st) return fail(cudaErrorInvalidResourceHandle);
    g_count.launches++;
    // RJEPA_EMU_FAULT_KERNEL=<text>: the first launch whose kernel name holds
    // <text> faults as an illegal address would (for tests of fault handling)
    static const char *fault_at = getenv("RJEPA_EMU_FAULT_KERNEL");
    static std::atomic<bool> fault_done{false};
    const bool inject = fault_at && *fault_at && strstr(name, fault_at) && !fault_done.exchange(true);
    auto fn = std::make_shared<std::function<void()>>(std::move(body));
    st->push([fn, name, grid, block, inject] {
        if (sticky()) return; // a faulted device runs nothing more
        if (inject) {
            diagnose("kernel %s: fault injected by RJEPA_EMU_FAULT_KERNEL", name);
            set_sticky(cudaErrorIllegalAddress);
            return;
        }
        GridJob job;
        job.body = fn.get();
        job.name = name;
        job.grid = grid;
        job.block = block;
        job.total = (long)grid.x * grid.y * grid.z;
        if (!Pool::get().run(job)) set_sticky(cudaErrorLaunchFailure);
    });
    return cudaSuccess;
}

// ---------------------------------------------------------------------------
// the runtime API
// ---------------------------------------------------------------------------
using namespace rl_emu;

extern "C" {

cudaError_t cudaGetLastError(void)
{
    if (cudaError_t e = sticky()) return e;
    cudaError_t e = (cudaError_t)tls_last_error;
    tls_last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void)
{
    if (cudaError_t e = sticky()) return e;
    return (cudaError_t)tls_last_error;
}

static const struct {
    cudaError_t e;
    const char *name, *text;
} k_errors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInitializationError, "cudaErrorInitializationError", "initialization error"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration",
     "invalid configuration argument"},
    {cudaErrorInvalidDevicePointer, "cudaErrorInvalidDevicePointer", "invalid device pointer"},
    {cudaErrorInvalidMemcpyDirection, "cudaErrorInvalidMemcpyDirection",
     "invalid copy direction for memcpy"},
    {cudaErrorInsufficientDriver, "cudaErrorInsufficientDriver",
     "CUDA driver version is insufficient for CUDA runtime version"},
    {cudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle",
     "invalid resource handle"},
    {cudaErrorNotReady, "cudaErrorNotReady", "device not ready"},
    {cudaErrorIllegalAddress, "cudaErrorIllegalAddress",
     "an illegal memory access was encountered"},
    {cudaErrorLaunchOutOfResources, "cudaErrorLaunchOutOfResources",
     "too many resources requested for launch"},
    {cudaErrorMisalignedAddress, "cudaErrorMisalignedAddress", "misaligned address"},
    {cudaErrorLaunchFailure, "cudaErrorLaunchFailure", "unspecified launch failure"},
    {cudaErrorNotSupported, "cudaErrorNotSupported", "operation not supported"},
    {cudaErrorUnknown, "cudaErrorUnknown", "unknown error"},
};

const char *cudaGetErrorName(cudaError_t error)
{
    for (const auto &k : k_errors)
        if (k.e == error) return k.name;
    return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t error)
{
    for (const auto &k : k_errors)
        if (k.e == error) return k.text;
    return "unknown error";
}

static __thread int tls_device = 0;

cudaError_t cudaGetDeviceCount(int *count)
{
    if (!count) return fail(cudaErrorInvalidValue);
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *device)
{
    if (!device) return fail(cudaErrorInvalidValue);
    *device = tls_device;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device)
{
    if (device != 0) return fail(cudaErrorInvalidDevice);
    tls_device = device;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device)
{
    if (!value) return fail(cudaErrorInvalidValue);
    if (device != 0) return fail(cudaErrorInvalidDevice);
    switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = Pool::get().workers(); break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int *version)
{
    if (!version) return fail(cudaErrorInvalidValue);
    *version = CUDART_VERSION;
    return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int *version)
{
    if (!version) return fail(cudaErrorInvalidValue);
    *version = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    g_count.device_syncs++;
    default_stream()->drain();
    std::vector<CUstream_st *> all;
    {
        std::lock_guard<std::mutex> lk(g_streams_mu);
        for (auto &kv : g_streams) all.push_back(kv.second);
    }
    for (auto *s : all) s->drain();
    return sticky();
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (!free_bytes || !total_bytes) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lk(g_mem_mu);
    *total_bytes = device_capacity();
    *free_bytes = device_capacity() - std::min(device_capacity(), g_device_used);
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **ptr, size_t size)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (!ptr) return fail(cudaErrorInvalidValue);
    *ptr = nullptr;
    if (size == 0) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lk(g_mem_mu);
        if (size > device_capacity() - std::min(device_capacity(), g_device_used))
            return fail(cudaErrorMemoryAllocation);
        g_device_used += size; // reserved before the (slow) fill
        g_device_peak = std::max(g_device_peak, g_device_used);
    }
    void *p = nullptr;
    if (posix_memalign(&p, 256, size) != 0) {
        std::lock_guard<std::mutex> lk(g_mem_mu);
        g_device_used -= size;
        return fail(cudaErrorMemoryAllocation);
    }
    memset(p, 0xff, size); // NaN in f32 and bf16: unwritten outputs show
    std::lock_guard<std::mutex> lk(g_mem_mu);
    g_device[(uintptr_t)p] = size;
    *ptr = p;
    return cudaSuccess;
}

// cudaFree and cudaFreeHost synchronise the device with the host: nothing
// queued may still read or write the memory they give back
static void drain_all_streams()
{
    default_stream()->drain();
    std::vector<CUstream_st *> all;
    {
        std::lock_guard<std::mutex> lk(g_streams_mu);
        for (auto &kv : g_streams) all.push_back(kv.second);
    }
    for (auto *s : all) s->drain();
}

cudaError_t cudaFree(void *ptr)
{
    if (!ptr) return cudaSuccess;
    drain_all_streams();
    std::lock_guard<std::mutex> lk(g_mem_mu);
    auto it = g_device.find((uintptr_t)ptr);
    if (it == g_device.end()) return fail(cudaErrorInvalidDevicePointer);
    g_device_used -= it->second;
    g_device.erase(it);
    free(ptr);
    return sticky();
}

cudaError_t cudaHostAlloc(void **ptr, size_t size, unsigned int flags)
{
    if (!ptr || (flags & ~0x7u)) return fail(cudaErrorInvalidValue);
    *ptr = nullptr;
    void *p = nullptr;
    if (posix_memalign(&p, 4096, size ? size : 1) != 0) return fail(cudaErrorMemoryAllocation);
    memset(p, 0xff, size);
    std::lock_guard<std::mutex> lk(g_mem_mu);
    g_pinned[(uintptr_t)p] = size;
    *ptr = p;
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **ptr, size_t size) { return cudaHostAlloc(ptr, size, 0); }

cudaError_t cudaFreeHost(void *ptr)
{
    if (!ptr) return cudaSuccess;
    drain_all_streams();
    std::lock_guard<std::mutex> lk(g_mem_mu);
    auto it = g_pinned.find((uintptr_t)ptr);
    if (it == g_pinned.end()) return fail(cudaErrorInvalidValue);
    g_pinned.erase(it);
    free(ptr);
    return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *ptr)
{
    if (!a) return fail(cudaErrorInvalidValue);
    memset(a, 0, sizeof *a);
    a->device = -2;
    std::lock_guard<std::mutex> lk(g_mem_mu);
    if (in_range(g_device, ptr, 1)) {
        a->type = cudaMemoryTypeDevice;
        a->device = 0;
        a->devicePointer = (void *)ptr;
    } else if (in_range(g_pinned, ptr, 1)) {
        a->type = cudaMemoryTypeHost;
        a->device = 0;
        a->devicePointer = a->hostPointer = (void *)ptr;
    } else {
        a->type = cudaMemoryTypeUnregistered;
    }
    return cudaSuccess;
}

// where a copy's ends are; cudaErrorInvalidValue for a device side outside any allocation
static cudaError_t check_copy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                              bool *src_dev, bool *dst_dev)
{
    *src_dev = is_device(src, n);
    *dst_dev = is_device(dst, n);
    switch (kind) {
    case cudaMemcpyHostToDevice: if (!*dst_dev || *src_dev) goto bad; break;
    case cudaMemcpyDeviceToHost: if (!*src_dev || *dst_dev) goto bad; break;
    case cudaMemcpyDeviceToDevice: if (!*src_dev || !*dst_dev) goto bad; break;
    case cudaMemcpyHostToHost: if (*src_dev || *dst_dev) goto bad; break;
    case cudaMemcpyDefault: break;
    default: return cudaErrorInvalidMemcpyDirection;
    }
    return cudaSuccess;
bad:
    diagnose("cudaMemcpy of %zu bytes: %p -> %p is not %s (a device range outside every "
             "allocation?)", n, src, dst,
             kind == cudaMemcpyHostToDevice ? "host to device"
             : kind == cudaMemcpyDeviceToHost ? "device to host"
             : kind == cudaMemcpyDeviceToDevice ? "device to device" : "host to host");
    return cudaErrorInvalidValue;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (count == 0) return cudaSuccess;
    if (!dst || !src) return fail(cudaErrorInvalidValue);
    CUstream_st *st = stream_of(stream);
    if (!st) return fail(cudaErrorInvalidResourceHandle);
    bool src_dev, dst_dev;
    if (cudaError_t e = check_copy(dst, src, count, kind, &src_dev, &dst_dev)) return fail(e);
    if (src_dev && !dst_dev) g_count.d2h += (long long)count;
    if (dst_dev && !src_dev) g_count.h2d += (long long)count;
    if (!src_dev && !is_pinned(src, count)) {
        // pageable source: staged now (the caller may reuse it at once)
        auto copy = std::make_shared<std::vector<char>>((const char *)src, (const char *)src + count);
        st->push([dst, copy] { if (!sticky()) memcpy(dst, copy->data(), copy->size()); });
        return cudaSuccess;
    }
    st->push([dst, src, count] { if (!sticky()) memcpy(dst, src, count); });
    if (!dst_dev && !is_pinned(dst, count)) { // pageable destination: the call blocks
        g_count.blocking_copies++;
        st->drain();
        return sticky();
    }
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind)
{
    cudaError_t e = cudaMemcpyAsync(dst, src, count, kind, nullptr);
    if (e != cudaSuccess) return e;
    g_count.blocking_copies++;
    default_stream()->drain();
    return sticky();
}

cudaError_t cudaMemsetAsync(void *ptr, int value, size_t count, cudaStream_t stream)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (count == 0) return cudaSuccess;
    CUstream_st *st = stream_of(stream);
    if (!st) return fail(cudaErrorInvalidResourceHandle);
    if (!is_device(ptr, count)) return fail(cudaErrorInvalidValue);
    st->push([ptr, value, count] { if (!sticky()) memset(ptr, value, count); });
    return cudaSuccess;
}

cudaError_t cudaMemset(void *ptr, int value, size_t count)
{
    cudaError_t e = cudaMemsetAsync(ptr, value, count, nullptr);
    if (e != cudaSuccess) return e;
    default_stream()->drain();
    return sticky();
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (!stream || flags > 1) return fail(cudaErrorInvalidValue);
    CUstream_st *s = new CUstream_st();
    std::lock_guard<std::mutex> lk(g_streams_mu);
    g_streams[s] = s;
    *stream = s;
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t *stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    {
        std::lock_guard<std::mutex> lk(g_streams_mu);
        if (!g_streams.erase(stream)) return fail(cudaErrorInvalidResourceHandle);
    }
    stream->drain(); // the real one returns at once and frees the stream when its work is done
    delete stream;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    CUstream_st *st = stream_of(stream);
    if (!st) return fail(cudaErrorInvalidResourceHandle);
    g_count.stream_syncs++;
    st->drain();
    return sticky();
}

cudaError_t cudaStreamQuery(cudaStream_t stream)
{
    CUstream_st *st = stream_of(stream);
    if (!st) return fail(cudaErrorInvalidResourceHandle);
    if (cudaError_t e = sticky()) return e;
    return st->idle() ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void *user_data)
{
    if (cudaError_t e = sticky()) return fail(e);
    CUstream_st *st = stream_of(stream);
    if (!st || !fn) return fail(!st ? cudaErrorInvalidResourceHandle : cudaErrorInvalidValue);
    st->push([fn, user_data] { if (!sticky()) fn(user_data); });
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (!event || (flags & ~0x7u)) return fail(cudaErrorInvalidValue);
    CUevent_st *ev = new CUevent_st();
    std::lock_guard<std::mutex> lk(g_streams_mu);
    g_events[ev] = ev;
    *event = ev;
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *event) { return cudaEventCreateWithFlags(event, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t event)
{
    {
        std::lock_guard<std::mutex> lk(g_streams_mu);
        if (!g_events.erase(event)) return fail(cudaErrorInvalidResourceHandle);
    }
    // work that still completes it may be queued: wait for it, as the real one defers the free
    {
        std::unique_lock<std::mutex> lk(event->mu);
        event->cv.wait(lk, [&] { return event->completed >= event->recorded || sticky(); });
    }
    if (!sticky()) delete event; // after a fault queued work may still name it: leak it
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
{
    if (cudaError_t e = sticky()) return fail(e);
    if (!event_known(event)) return fail(cudaErrorInvalidResourceHandle);
    CUstream_st *st = stream_of(stream);
    if (!st) return fail(cudaErrorInvalidResourceHandle);
    uint64_t gen;
    {
        std::lock_guard<std::mutex> lk(event->mu);
        gen = ++event->recorded;
    }
    st->push([event, gen] {
        std::lock_guard<std::mutex> lk(event->mu);
        event->completed = std::max(event->completed, gen);
        event->cv.notify_all();
    });
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event)
{
    if (!event_known(event)) return fail(cudaErrorInvalidResourceHandle);
    g_count.event_syncs++;
    std::unique_lock<std::mutex> lk(event->mu);
    const uint64_t want = event->recorded;
    event->cv.wait(lk, [&] { return event->completed >= want; });
    return sticky();
}

cudaError_t cudaEventQuery(cudaEvent_t event)
{
    if (!event_known(event)) return fail(cudaErrorInvalidResourceHandle);
    if (cudaError_t e = sticky()) return e;
    std::lock_guard<std::mutex> lk(event->mu);
    return event->completed >= event->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
    // the emulator keeps no timing: what the real runtime answers for events
    // created with cudaEventDisableTiming
    (void)ms;
    (void)start;
    (void)end;
    return fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags)
{
    if (cudaError_t e = sticky()) return fail(e);
    CUstream_st *st = stream_of(stream);
    if (!st || !event_known(event)) return fail(cudaErrorInvalidResourceHandle);
    if (flags) return fail(cudaErrorInvalidValue);
    uint64_t gen;
    {
        std::lock_guard<std::mutex> lk(event->mu);
        gen = event->recorded;
    }
    st->push([event, gen] {
        std::unique_lock<std::mutex> lk(event->mu);
        event->cv.wait(lk, [&] { return event->completed >= gen; });
    });
    return cudaSuccess;
}

} // extern "C"

namespace rl_emu {
bool stream_push(cudaStream_t s, std::function<void()> fn)
{
    CUstream_st *st = stream_of(s);
    if (!st) return false;
    st->push(std::move(fn));
    return true;
}
bool device_range(const void *p, size_t n) { return is_device(p, n); }
void report(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    diagnose("%s", buf);
}
void count_gemm() { g_count.gemms++; }
bool faulted() { return sticky() != cudaSuccess; }
} // namespace rl_emu

extern "C" {

void rl_emu_get_counters(rl_emu_counters *out)
{
    memset(out, 0, sizeof *out);
    out->stream_syncs = g_count.stream_syncs;
    out->event_syncs = g_count.event_syncs;
    out->device_syncs = g_count.device_syncs;
    out->blocking_copies = g_count.blocking_copies;
    out->launches = g_count.launches;
    out->blocks = g_count.blocks;
    out->gemms = g_count.gemms;
    out->h2d_bytes = g_count.h2d;
    out->d2h_bytes = g_count.d2h;
    std::lock_guard<std::mutex> lk(g_mem_mu);
    out->device_bytes_in_use = (long long)g_device_used;
    out->device_bytes_peak = (long long)g_device_peak;
}

void rl_emu_reset_counters(void)
{
    g_count.stream_syncs = g_count.event_syncs = g_count.device_syncs = 0;
    g_count.blocking_copies = g_count.launches = g_count.blocks = g_count.gemms = 0;
    g_count.h2d = g_count.d2h = 0;
    std::lock_guard<std::mutex> lk(g_mem_mu);
    g_device_peak = g_device_used;
}

const char *rl_emu_last_diagnostic(void)
{
    static __thread char buf[1024];
    std::lock_guard<std::mutex> lk(g_diag_mu);
    snprintf(buf, sizeof buf, "%s", g_diag.c_str());
    return buf;
}

} // extern "C"
