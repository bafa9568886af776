// Runs kernels/cuda/paged_attention.cu on the host, to check the serving
// engine's KV write and paged attention where there is no GPU (NVRTC only
// proves that they compile): steps mixing prefill and decode rows of
// sequences whose pages are scattered through the pool, launched as
// worker/src/cuda/paged_attention.rs launches them (one block of 4 warps per
// output row and head), against a plain copy and an f64 causal GQA attention
// over the same pages. Every CUDA thread is an OS thread
// (include/cuda_host.h); shared memory is static, one block at a time.
//
//   g++ -std=c++20 -O2 -pthread -w -Ikernels/emu/include \
//       kernels/emu/paged_attention_emu.cpp -o /tmp/pa-emu && /tmp/pa-emu
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_host.h"
#define __shared__ static
#include "../cuda/common.cuh"
#include "../cuda/paged_attention.cu"

static int failures = 0;

int main() {
    struct Case { int heads, kv_heads, head_dim, page_size; std::vector<int> cached, step; };
    // Per sequence: positions already cached, and rows this step (a prefill
    // chunk, or 1 for decode). Lengths cross page boundaries, one sequence
    // is a single token, another is longer than PA_WARPS * 32 positions.
    const Case cases[] = {
        {8, 2, 64, 16, {0, 5, 40}, {7, 1, 1}},
        {4, 4, 6, 4, {0, 0}, {1, 9}},
        {1, 1, 256, 8, {200}, {3}},
        {16, 4, 130, 2, {3, 0, 17}, {1, 33, 2}},
    };
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (const auto& c : cases) {
        const int width = c.kv_heads * c.head_dim, sequences = (int)c.cached.size();
        // Each sequence's pages, taken at random from one shared pool.
        std::vector<std::vector<int>> pages(sequences);
        int pool_pages = 0;
        for (int s = 0; s < sequences; ++s) pool_pages += (c.cached[s] + c.step[s] + c.page_size - 1) / c.page_size + 1;
        std::vector<int> free(pool_pages);
        std::iota(free.begin(), free.end(), 0);
        std::shuffle(free.begin(), free.end(), rng);
        for (int s = 0; s < sequences; ++s)
            for (int t = 0; t < c.cached[s] + c.step[s]; t += c.page_size) pages[s].push_back(free.back()), free.pop_back();
        const size_t pool_rows = (size_t)pool_pages * c.page_size;
        std::vector<float> keys(pool_rows * width, NAN), values(pool_rows * width, NAN);
        auto slot_of = [&](int s, int t) { return pages[s][t / c.page_size] * c.page_size + t % c.page_size; };
        // What earlier steps cached.
        for (int s = 0; s < sequences; ++s)
            for (int t = 0; t < c.cached[s]; ++t)
                for (int i = 0; i < width; ++i)
                    keys[(size_t)slot_of(s, t) * width + i] = normal(rng), values[(size_t)slot_of(s, t) * width + i] = normal(rng);
        // This step's rows: q, k, v, positions, slots, page tables.
        std::vector<int> positions, table_offsets, page_table, slots, row_sequence;
        for (int s = 0; s < sequences; ++s) {
            const int offset = (int)page_table.size();
            page_table.insert(page_table.end(), pages[s].begin(), pages[s].end());
            for (int j = 0; j < c.step[s]; ++j) {
                const int t = c.cached[s] + j;
                positions.push_back(t), table_offsets.push_back(offset), slots.push_back(slot_of(s, t));
                row_sequence.push_back(s);
            }
        }
        const int rows = (int)positions.size();
        std::vector<float> q((size_t)rows * c.heads * c.head_dim), k((size_t)rows * width), v(k.size());
        for (auto* m : {&q, &k, &v}) for (auto& x : *m) x = normal(rng);

        auto want_keys = keys, want_values = values;
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < width; ++i)
                want_keys[(size_t)slots[r] * width + i] = k[(size_t)r * width + i],
                want_values[(size_t)slots[r] * width + i] = v[(size_t)r * width + i];
        const size_t total = (size_t)rows * width;
        launch_grid({(unsigned)std::min<size_t>((total + 255) / 256, 65535), 1, 1}, 256, [] {}, [&] {
            kv_write_f32(keys.data(), values.data(), k.data(), v.data(), slots.data(), rows, width);
        });
        const bool written = std::memcmp(keys.data(), want_keys.data(), keys.size() * 4) == 0 &&
                             std::memcmp(values.data(), want_values.data(), values.size() * 4) == 0;
        std::printf("  %-4s kv_write          heads %d/%d dim %d page %d\n", written ? "ok" : "FAIL", c.heads, c.kv_heads, c.head_dim, c.page_size);
        failures += !written;

        // Every row (prefill), then each sequence's last row only (what a
        // step samples from).
        std::vector<int> every(rows), last;
        std::iota(every.begin(), every.end(), 0);
        for (int r = 0; r < rows; ++r) if (r + 1 == rows || row_sequence[r + 1] != row_sequence[r]) last.push_back(r);
        for (const auto* query_rows : {&every, &last}) {
            const int out_rows = (int)query_rows->size(), q_width = c.heads * c.head_dim;
            std::vector<float> out((size_t)out_rows * q_width, NAN);
            const float scale = 1.0f / std::sqrt((float)c.head_dim);
            launch_grid({(unsigned)out_rows, (unsigned)c.heads, 1}, PA_WARPS * 32, [] {}, [&] {
                paged_attention_f32(out.data(), q.data(), keys.data(), values.data(), query_rows->data(), positions.data(),
                                    table_offsets.data(), page_table.data(), c.heads, c.kv_heads, c.head_dim, c.page_size,
                                    scale);
            });
            double worst = 0, largest = 0;
            for (int o = 0; o < out_rows; ++o) {
                const int r = (*query_rows)[o], s = row_sequence[r], group = c.heads / c.kv_heads;
                for (int h = 0; h < c.heads; ++h) {
                    const int kh = h / group;
                    std::vector<double> p(positions[r] + 1);
                    double m = -INFINITY, sum = 0;
                    for (int t = 0; t <= positions[r]; ++t) {
                        double dot = 0;
                        for (int d = 0; d < c.head_dim; ++d)
                            dot += (double)q[((size_t)r * c.heads + h) * c.head_dim + d] * keys[(size_t)slot_of(s, t) * width + kh * c.head_dim + d];
                        p[t] = dot * scale, m = std::max(m, p[t]);
                    }
                    for (auto& x : p) x = std::exp(x - m), sum += x;
                    for (int d = 0; d < c.head_dim; ++d) {
                        double want = 0;
                        for (int t = 0; t <= positions[r]; ++t) want += p[t] / sum * values[(size_t)slot_of(s, t) * width + kh * c.head_dim + d];
                        const double got = out[((size_t)o * c.heads + h) * c.head_dim + d];
                        worst = std::max(worst, std::isnan(got) ? INFINITY : std::fabs(got - want));
                        largest = std::max(largest, std::fabs(want));
                    }
                }
            }
            // f32 online softmax against f64: a few f32 roundings per position.
            const bool ok = worst <= 1e-5 * largest + 1e-6;
            std::printf("  %-4s paged_attention   heads %d/%d dim %d page %d, %s rows: max err %.2e (max |out| %.2f)\n",
                        ok ? "ok" : "FAIL", c.heads, c.kv_heads, c.head_dim, c.page_size,
                        query_rows == &every ? "every" : "last", worst, largest);
            failures += !ok;
        }
    }
    std::printf(failures ? "SOME FAILED\n" : "ALL OK\n");
    return failures ? 1 : 0;
}
