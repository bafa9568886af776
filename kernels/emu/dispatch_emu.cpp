// Runs the MoE layer's dispatch family (kernels/cuda/permute.cu) and the two
// elementwise backward kernels whose outputs the device trainer no longer
// zeroes first (swiglu_backward_f32, cross_entropy_backward_f32) on the host,
// launched as worker/src/cuda/{dispatch,swiglu,cross_entropy}.rs launch them,
// against plain loops:
// - the stable counting sort of slots by expert (moe_chunk_counts,
//   moe_scan_offsets, moe_scatter_slots) exactly, with an expert no slot
//   chose and chunks that end mid-warp;
// - permute, permute backward and the gated unpermute;
// - the unpermute's backward, swiglu's and cross-entropy's: with
//   accumulate == 0 over garbage they write what adding into zeros would,
//   bit for bit; with accumulate == 1 they add to what is there.
// Every CUDA thread is an OS thread (include/cuda_host.h); static shared
// memory is a function-local static, dynamic shared memory one buffer, one
// block at a time.
//
//   g++ -std=c++20 -O2 -pthread -w -Ikernels/emu/include \
//       kernels/emu/dispatch_emu.cpp -o /tmp/dispatch-emu && /tmp/dispatch-emu
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_host.h"

// What permute.cu's kernels use beyond cuda_host.h.
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct __nv_bfloat162 { uint16_t x, y; };
static inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static inline uint16_t float_to_bf16(float f) {  // nearest even, as __float2bfloat16_rn
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {bf16_to_float(v.x), bf16_to_float(v.y)}; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {float_to_bf16(a), float_to_bf16(b)}; }
static inline int atomicAdd(int* at, int v) { return __atomic_fetch_add(at, v, __ATOMIC_RELAXED); }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int match_slots[32][32];
// Every lane of the warp must call it (the scatter's loop is warp-uniform).
static inline unsigned __match_any_sync(unsigned, int v) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    match_slots[w][lane] = v;
    __syncwarp();
    unsigned peers = 0;
    for (int l = 0; l < 32; ++l) peers |= (unsigned)(match_slots[w][l] == v) << l;
    __syncwarp();
    return peers;
}

alignas(16) static unsigned char dynamic_shared[1 << 16];
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(dynamic_shared)
#define __shared__ static
#include "../cuda/common.cuh"
#include "../cuda/cross_entropy.cu"
#include "../cuda/permute.cu"
#include "../cuda/swiglu.cu"

static int failures = 0;

static void report(bool ok, const char* what, const char* detail) {
    std::printf("  %-4s %-34s %s\n", ok ? "ok" : "FAIL", what, detail);
    failures += !ok;
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

static void blocks(size_t n, unsigned threads, const std::function<void()>& body) {
    launch_grid({(unsigned)n, 1, 1}, threads, [] {}, body);
}

// elementwise() in worker/src/cuda/mod.rs: blocks of 256 over a grid-stride loop.
static void elementwise(size_t n, const std::function<void()>& body) {
    blocks(std::clamp<size_t>((n + 255) / 256, 1, 65535), 256, body);
}

int main() {
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto randoms = [&](size_t n) {
        std::vector<float> v(n);
        for (auto& x : v) x = normal(rng);
        return v;
    };
    char detail[128];

    // Dispatch: CHUNK = 256 slots per chunk as in dispatch.rs; 100 tokens of
    // top-3 make a last chunk of 44 slots (not a whole number of warps).
    const int chunk = 256;
    for (const auto [tokens, top_k, n_experts, hidden] : {std::tuple{100, 3, 10, 8}, {1, 1, 4, 4}, {40, 8, 64, 12}}) {
        const int slots = tokens * top_k, chunks = (slots + chunk - 1) / chunk;
        std::vector<int> experts(slots);
        // Skewed: expert 1 in about half the slots; the last expert in none.
        for (auto& e : experts) e = rng() % 2 ? 1 % n_experts : (int)(rng() % std::max(1, n_experts - 1));
        // The stable counting sort.
        std::vector<int> want_offsets(n_experts + 1, 0), want_row(slots);
        for (int e : experts) want_offsets[e + 1]++;
        for (int e = 0; e < n_experts; ++e) want_offsets[e + 1] += want_offsets[e];
        auto next = want_offsets;
        for (int s = 0; s < slots; ++s) want_row[s] = next[experts[s]]++;

        std::vector<int> chunk_counts((size_t)chunks * n_experts), chunk_base(chunk_counts.size());
        std::vector<int> offsets(n_experts + 1, -1), row_of_slot(slots, -1), slot_of_row(slots, -1);
        blocks(chunks, 256, [&] { moe_chunk_counts(chunk_counts.data(), experts.data(), slots, n_experts, chunk); });
        const unsigned scan_threads = (n_experts + 31) / 32 * 32;
        blocks(1, scan_threads,
               [&] { moe_scan_offsets(offsets.data(), chunk_base.data(), chunk_counts.data(), chunks, n_experts); });
        blocks(chunks, 32, [&] {
            moe_scatter_slots(row_of_slot.data(), slot_of_row.data(), experts.data(), chunk_base.data(), slots,
                              n_experts, chunk);
        });
        bool inverse = true;
        for (int s = 0; s < slots; ++s) inverse &= row_of_slot[s] >= 0 && slot_of_row[row_of_slot[s]] == s;
        std::snprintf(detail, sizeof detail, "%d tokens, top-%d, %d experts", tokens, top_k, n_experts);
        report(offsets == want_offsets && row_of_slot == want_row && inverse, "dispatch sort", detail);

        // Permute (rows as 16-byte vectors), its backward, the gated unpermute.
        const auto x = randoms((size_t)tokens * hidden), y = randoms((size_t)slots * hidden);
        const auto gates = randoms(slots), dout = randoms((size_t)tokens * hidden);
        std::vector<float> xp((size_t)slots * hidden, NAN);
        blocks(slots, 128, [&] {
            moe_permute_rows(reinterpret_cast<uint4*>(xp.data()), reinterpret_cast<const uint4*>(x.data()),
                             slot_of_row.data(), slots, hidden / 4, top_k);
        });
        std::vector<float> want_xp(xp.size());
        for (int s = 0; s < slots; ++s)
            std::copy_n(&x[(size_t)(s / top_k) * hidden], hidden, &want_xp[(size_t)want_row[s] * hidden]);
        report(same_bits(xp, want_xp), "permute", detail);

        std::vector<float> dx = randoms((size_t)tokens * hidden), out((size_t)tokens * hidden, NAN);
        auto want_dx = dx;
        std::vector<float> want_out(out.size());
        for (int t = 0; t < tokens; ++t)
            for (int i = 0; i < hidden; ++i) {
                float sum = 0.0f, gated = 0.0f;
                for (int j = 0; j < top_k; ++j) {
                    const size_t row = (size_t)want_row[t * top_k + j] * hidden + i;
                    sum += xp[row];
                    gated += gates[t * top_k + j] * y[row];
                }
                want_dx[(size_t)t * hidden + i] += sum;
                want_out[(size_t)t * hidden + i] = gated;
            }
        blocks(tokens, 256, [&] {
            moe_permute_backward_f32(dx.data(), xp.data(), row_of_slot.data(), tokens, hidden, top_k);
        });
        report(same_bits(dx, want_dx), "permute backward (adds)", detail);
        blocks(tokens, 128, [&] {
            moe_unpermute_f32(out.data(), y.data(), gates.data(), row_of_slot.data(), tokens, hidden, top_k);
        });
        report(same_bits(out, want_out), "unpermute", detail);

        // Unpermute backward into garbage, then once more adding.
        std::vector<double> want_dy(y.size(), 0.0), want_dgates(slots, 0.0);
        for (int t = 0; t < tokens; ++t)
            for (int j = 0; j < top_k; ++j) {
                const int slot = t * top_k + j;
                const size_t row = (size_t)want_row[slot] * hidden;
                for (int i = 0; i < hidden; ++i) {
                    want_dy[row + i] = gates[slot] * dout[(size_t)t * hidden + i];
                    want_dgates[slot] += (double)dout[(size_t)t * hidden + i] * y[row + i];
                }
            }
        auto dy = randoms(y.size()), dgates = randoms(slots);
        auto unpermute_backward = [&](int accumulate) {
            blocks(tokens, 256, [&] {
                moe_unpermute_backward_f32(dy.data(), dgates.data(), dout.data(), y.data(), gates.data(),
                                           row_of_slot.data(), tokens, hidden, top_k, accumulate);
            });
        };
        double worst = 0.0;
        for (const int accumulate : {0, 1}) {
            const auto before_dy = dy, before_dgates = dgates;
            unpermute_backward(accumulate);
            for (size_t i = 0; i < dy.size(); ++i)
                worst = std::max(worst, std::fabs(dy[i] - ((accumulate ? before_dy[i] : 0.0) + want_dy[i])));
            for (int s = 0; s < slots; ++s)
                worst = std::max(worst, std::fabs(dgates[s] - ((accumulate ? before_dgates[s] : 0.0) + want_dgates[s])));
        }
        std::snprintf(detail, sizeof detail, "%d tokens, top-%d: max err %.1e", tokens, top_k, worst);
        report(worst < 1e-5, "unpermute backward (write, add)", detail);
    }

    // SwiGLU's backward: written over garbage equals added into zeros, bit
    // for bit; added, it is what is there plus the same values.
    for (const size_t n : {1, 1000, 5000}) {
        const auto a = randoms(n), b = randoms(n), dh = randoms(n);
        std::vector<float> zero_a(n, 0.0f), zero_b(n, 0.0f);
        elementwise(n, [&] { swiglu_backward_f32(zero_a.data(), zero_b.data(), dh.data(), a.data(), b.data(), n, 1); });
        auto da = randoms(n), db = randoms(n);
        elementwise(n, [&] { swiglu_backward_f32(da.data(), db.data(), dh.data(), a.data(), b.data(), n, 0); });
        const bool written = same_bits(da, zero_a) && same_bits(db, zero_b);
        const auto da0 = randoms(n), db0 = randoms(n);
        da = da0, db = db0;
        elementwise(n, [&] { swiglu_backward_f32(da.data(), db.data(), dh.data(), a.data(), b.data(), n, 1); });
        double worst = 0.0;
        for (size_t i = 0; i < n; ++i) {
            const double s = 1.0 / (1.0 + std::exp(-(double)a[i]));
            const double want_da = da0[i] + (double)dh[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
            const double want_db = db0[i] + (double)dh[i] * a[i] * s;
            worst = std::max({worst, std::fabs(da[i] - want_da), std::fabs(db[i] - want_db)});
        }
        std::snprintf(detail, sizeof detail, "n %zu: added max err %.1e", n, worst);
        report(written && worst < 1e-5, "swiglu backward (write, add)", detail);
    }

    // Cross-entropy's backward, 512 threads a row as cross_entropy.rs.
    for (const auto [rows, vocab] : {std::pair{3, 1000}, {1, 2}, {5, 700}}) {
        auto probs = randoms((size_t)rows * vocab);
        for (auto& p : probs) p = std::fabs(p);
        std::vector<unsigned> targets(rows);
        for (auto& t : targets) t = rng() % vocab;
        const std::vector<float> dlosses(rows, 1.0f / rows);
        std::vector<float> zero((size_t)rows * vocab, 0.0f);
        auto backward = [&](std::vector<float>& dz, int accumulate) {
            blocks(rows, 512, [&] {
                cross_entropy_backward_f32(dz.data(), dlosses.data(), probs.data(), targets.data(), rows, vocab,
                                           accumulate);
            });
        };
        backward(zero, 1);
        auto dz = randoms(zero.size());
        backward(dz, 0);
        const bool written = same_bits(dz, zero);
        const auto dz0 = randoms(zero.size());
        dz = dz0;
        backward(dz, 1);
        double worst = 0.0;
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < vocab; ++i) {
                const size_t at = (size_t)r * vocab + i;
                const double want = dz0[at] + (double)dlosses[r] * (probs[at] - (i == (int)targets[r] ? 1.0 : 0.0));
                worst = std::max(worst, std::fabs(dz[at] - want));
            }
        std::snprintf(detail, sizeof detail, "%d rows, vocab %d: added max err %.1e", rows, vocab, worst);
        report(written && worst < 1e-5, "cross-entropy backward (write, add)", detail);
    }
    std::printf(failures ? "SOME FAILED\n" : "ALL OK\n");
    return failures ? 1 : 0;
}
