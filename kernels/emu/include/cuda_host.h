// What a CUDA kernel family needs to run on the host (kernels/emu/*.cpp):
// the built-in indices, one OS thread per CUDA thread, __syncthreads and
// __syncwarp as barriers, __shfl_xor_sync through per-warp slots. Each
// emulator defines `__shared__` for its own kind of shared memory (static
// arrays, or one dynamic buffer) and anything else its kernels call.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx;
inline Dim3 blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __align__(n)
#define FULL_MASK 0xffffffffu
static inline int min(int a, int b) { return a < b ? a : b; }

inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shfl_slots[32][32];
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static inline void __syncwarp(unsigned = FULL_MASK) { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    shfl_slots[w][lane] = v;
    __syncwarp();
    const float r = shfl_slots[w][lane ^ offset];
    __syncwarp();
    return r;
}

// Bit casts and the integer atomics the kernels use (OS threads share memory
// as a GPU's threads do).
static inline unsigned __float_as_uint(float v) {
    unsigned bits;
    std::memcpy(&bits, &v, 4);
    return bits;
}
static inline float __uint_as_float(unsigned bits) {
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
}
static inline unsigned atomicMax(unsigned* at, unsigned v) {
    unsigned old = __atomic_load_n(at, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(at, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// Runs block `blockIdx` (set by the caller, with blockDim and gridDim):
// `threads` OS threads through `body`, joined before it returns.
inline void run_block(unsigned threads, const std::function<void()>& body) {
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warp_barriers.clear();
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) ts.emplace_back([&, t] { threadIdx = {t, 0, 0}; body(); });
    for (auto& t : ts) t.join();
}

// Every block of a grid, one after another.
inline void launch_grid(Dim3 grid, unsigned threads, const std::function<void()>& before_block,
                        const std::function<void()>& body) {
    blockDim = {threads, 1, 1};
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                before_block();
                run_block(threads, body);
            }
}
